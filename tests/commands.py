"""The commands as the tests run them: each with its error wrapper, returning what the command returns."""

from functools import partial

from fct_lightning.commands import run_command
from fct_lightning.commands.backfill import backfill_command
from fct_lightning.commands.evaluate import evaluate_command
from fct_lightning.commands.fit import fit
from fct_lightning.commands.gallery import embed_command, transform_command
from fct_lightning.commands.index import index_command, search_command
from fct_lightning.commands.report import report_command

eval_main = partial(run_command, "fct-eval", evaluate_command)
report_main = partial(run_command, "fct-report", report_command)
fit_main = partial(run_command, "fct-fit", fit)
embed_main = partial(run_command, "fct-embed", embed_command)
transform_main = partial(run_command, "fct-transform", transform_command)
backfill_main = partial(run_command, "fct-backfill", backfill_command)
index_main = partial(run_command, "fct-index", index_command)
search_main = partial(run_command, "fct-search", search_command)
