"""``deme merge --config=FILE --workdir=DIR``: searches merge weights for a finetuning workdir's replicas and
writes the merged model to DIR/merge/{orbax,diffusers}."""

from deme_jax.deme import merge_replicas


def run(config, workdir):
    return merge_replicas(config, workdir)
