"""MLflow tracking: `client` (the store, runs and secrets; no Ray), `trial_runs` (a trial's child run
written from replayable ops), `journal` (ops a tracking server did not take, kept in the run dir)
and `callback` (the Tune callback that feeds them; imports Ray)."""
