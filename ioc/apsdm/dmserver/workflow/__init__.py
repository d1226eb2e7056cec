"""Processing-job engine of the embedded DM service: workflow spec, job records, shell
rendering, repeatUntil conditions and the stage runner, one module each."""
