"""The lm-evaluation-harness tasks sheepop ships (one folder each: its YAML and data), found by
lm_eval's TaskManager through sheepop.model.lm_eval_adapter and named by `trainer.eval_tasks`."""
from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
