"""Training: the new layer on the cached vectors, then fine-tuning if asked.

`inputs` gives what the layer trains on, `head.train_head` trains it (with `optim` and, for
'auto', the `lr_find` range test) and `evaluate` judges it on the validation and test splits.
`fine_tune_stage` fine-tunes the whole network (`fine_tune_network`) or the blocks above a
`cut` (`fine_tune_partial`), both through `fine_tune_loop`, guarded by `early_stopping`."""
