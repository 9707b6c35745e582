"""catdog's trainer and the tools that use what it trains. The sub-packages, and the one rule each keeps on imports
(tests/test_layout.py checks every rule, module-level and function-level imports alike):

    config.py   the typed config tree (the schema)             no other train module
    config_io.py  reading a config (YAML, overrides, one-line errors) and writing one   only config.py
    hardware/   the machine: precision, allocator, GPU plan    no other train package (CPU counts: data_prep.cpus)
    data/       shards -> batches: order, reader, transforms   never the loop, a run, the tools, or accelerate
    models/     networks by name, pretrained weights            never data, the loop, a run, the tools, or accelerate
    metrics.py, plots.py   one definition of each metric and each drawing, shared by training and the tools;
                                                               no other train module
    loop/       one epoch, scoring a split, weight EMA          never data, a run or the tools
    formats/    on disk: the run-dir layout, the model bundle  never accelerate, the loop, a run or the tools
    run/        a training run: start, resume, image and cached-feature modes (siblings: neither imports the
                other; both use run/selection.py's best-checkpoint rule and formats/rundir.py), checkpoints,
                tracking                                        never the tools
    use/        using a trained model or a run: classifier loading, inputs, catdog-predict / -evaluate / -export /
                -report                                         never a run or the loop

Nothing inside the project imports in a cycle; data_prep never imports train or launch, train never imports launch.
"""
