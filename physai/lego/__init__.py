"""LEGO reasoning tasks: native batch generation, decoding, groups, and (in ``physai.lego.data``) torch datasets."""
from physai.lego.groups import Group, resolve_group, validate_cayley_table
from physai.lego.task import LegoBatch, LegoTask, Vocab

__all__ = ["LegoTask", "LegoBatch", "Vocab", "Group", "resolve_group", "validate_cayley_table"]
