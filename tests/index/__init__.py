"""Tests of fct_lightning.index and the fct-index / fct-search commands."""
