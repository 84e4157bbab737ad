"""The main job, `python -m miselbo.pipeline`: training stages (side by side where the cores allow),
their record and the re-run rules, the evaluation, the export, and the named presets (`run` is the
top-down story; `settings` its command line)."""
