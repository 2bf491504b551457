"""Datasets for distillation experiments, as Hugging Face ``DatasetDict`` with train/dev/test.

* :mod:`geodistill.data.classification`: sentence(-pair) classification (Rotten Tomatoes,
  Reuters R8/R52, 20 Newsgroups, election tweets, MultiEmo offline; local csv/tsv/jsonl/json;
  GLUE and other hub names).
* :mod:`geodistill.data.instructions`: instruction following (Natural Instructions v1 offline
  in the S-NI protocol; databricks-dolly-15k and the MiniLLM evaluation sets from the hub).
* :mod:`geodistill.data.splits`: the seeded stratified / grouped split helpers both use.
"""

from geodistill.data.classification import (
    ClassificationData,
    list_classification_datasets,
    load_classification,
)
from geodistill.data.instructions import (
    InstructionData,
    format_prompt,
    list_instruction_datasets,
    load_instructions,
)

__all__ = [
    "ClassificationData",
    "InstructionData",
    "format_prompt",
    "list_classification_datasets",
    "list_instruction_datasets",
    "load_classification",
    "load_instructions",
]
