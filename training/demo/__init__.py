"""`python -m training.demo`: the whole product on the bundled llama2.c teacher, stage by stage, resumable.

`config` (the demo's YAML: `DemoConfig`, `StudentRecipe`), `pipeline` (the stages and `main`), `report`
(`runs/demo/report.md`, its plots and the console summary).
"""
