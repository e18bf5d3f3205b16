"""Reporting reads a finished run: the `health` findings (logged by `console`), TensorBoard
`summaries`, the `html` report with its `pictures`, and the `audit` of the photos."""
