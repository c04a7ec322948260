"""The stages of the pipeline: each a function `stage(cfg, ...)` that the CLI (`vmddpm <stage>`), the
Snakemake rule and the DVC stage of the same name call.

Every stage composes the layers below it (runtime, trainkit, generation, evalkit, data, contracts, ...),
reads its knobs from the config, writes its outputs atomically and logs one MLflow run. Stages never
import each other (an import-linter contract in pyproject.toml): what one stage hands to the next is a
file whose contract is `vmddpm.contracts`.
"""
