"""Pre-training of the GPR generator on logs (MTP, VAFT): the library behind ``python -m agents.pretrain``.

- ``config``: ``PretrainConfig`` (one stage's settings, the CLI's flags) and the run-folder constants;
- ``data``: the inputs (log collection through ``agents.collection``, tokenizer fit), the session split and
  the row-aligned training tensors;
- ``trainer``: ``pretrain(cfg, dist) -> summary``, one stage in its run folder;
- ``evaluation``: held-out loss, HTE fit and HitRate / nDCG; the best checkpoint;
- ``checkpoint``: the checkpoint format;
- ``pipeline``: MTP then VAFT in one folder, each reused when done (``agents.hepo``'s first stages).
"""
