"""Analysis: what is made from finished steps' records.

`plots` (PNG figures), `report` and `report_html` (the self-contained HTML report of a run),
`metrics_cli` (`em metrics FILE` over any judged file). New analyses go here. May import the
stages (judge, sample, train), models, data and the base; never experiments.
"""
