"""The project folder a pipeline works in: where each stage's files are (`paths.py`), loading the data and the
ingredient store the stages share (`loading.py`), the results files (`results.py`), the stage inputs as dvc.yaml
declares them (`inputs.py`), the code digests dvc.yaml declares (`code.py`), and the scaffolding `soup-pipeline init`
writes (`scaffold.py`)."""
