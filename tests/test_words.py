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
