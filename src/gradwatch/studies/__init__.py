"""STUDIES: curated experiments; each module gives ``jobs()`` and ``summarize(runs)``, no training code."""
