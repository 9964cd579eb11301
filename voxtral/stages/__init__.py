"""The batch stages (index → scrape → preprocess → train): per-item functions first, the Ray
Data / Ray Train plan at the bottom of each module. The building blocks they use live one
level up in ``voxtral/`` and import no Ray. See ARCHITECTURE.md."""
