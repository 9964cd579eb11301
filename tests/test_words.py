"""voxtral/words.py: which chunks need speech recognition, and whose words a token row keeps."""

from __future__ import annotations

from voxtral import words


def test_which_chunks_need_asr_and_whose_words_count():
    cap = [{"word": "hi", "start_s": 0.5, "end_s": 0.8}]
    assert words.needs_asr(None, "auto") and words.needs_asr([], "auto")
    assert words.needs_asr([{"word": " ", "start_s": 0, "end_s": 1}], "auto")
    assert not words.needs_asr(cap, "auto") and words.needs_asr(cap, "asr")
    assert not words.needs_asr(None, "captions")
    heard = [{"word": "yo", "start_s": 0.1, "end_s": 0.2}]
    assert words.choose_words(cap, None) == (
        [{**cap[0], "speaker": None}],
        "captions",
    )
    assert words.choose_words(cap, heard)[1] == "asr"
    assert words.choose_words(None, []) == ([], "none")
    assert words.choose_words(None, None) == ([], "none")
    # chunk rows from diarisation carry a speaker: it is kept, as text
    (w,) = words.as_words([{**cap[0], "speaker": 1}])
    assert w["speaker"] == "1"


def test_words_without_a_speaker_get_the_turn_they_fall_in():
    """Whisper's words carry no speaker: the chunk's turns (diarisation) give them one; a
    caption word that has one keeps it, and a chunk without turns leaves them null."""
    turns = [
        {"start_s": 0.0, "end_s": 2.0, "speaker": "S0", "overlap": False},
        {"start_s": 2.2, "end_s": 4.0, "speaker": "S1", "overlap": False},
    ]
    heard = [
        {"word": "hello", "start_s": 0.5, "end_s": 0.9},
        {"word": "there", "start_s": 2.5, "end_s": 2.9},
        {"word": "late", "start_s": 4.2, "end_s": 4.4},  # just past the last turn
        {"word": "lost", "start_s": 9.0, "end_s": 9.2},  # far from any turn
    ]
    got, source = words.choose_words(None, heard, turns)
    assert source == "asr"
    assert [w["speaker"] for w in got] == ["S0", "S1", "S1", None]
    caps = [{"word": "hi", "start_s": 0.5, "end_s": 0.8, "speaker": "S1"}]
    assert words.choose_words(caps, None, turns)[0][0]["speaker"] == "S1"
    assert [w["speaker"] for w in words.choose_words(None, heard)[0]] == [None] * 4
