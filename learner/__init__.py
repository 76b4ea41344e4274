"""learner: LoRA fine-tuning of the encoder on train pairs, published to :mod:`models.registry`.

Modules, in the order a pair meets them: :mod:`.intake` (dedupe, held-out window,
micro-batches), :mod:`.trainer` (peft LoRA, in-batch contrastive loss), :mod:`.checkpoint`
(offsets and training state committed together), :mod:`.evaluate` and :mod:`.metrics`
(Recall@10 / NDCG@10 on the window), :mod:`.publish` (the publish rule), :mod:`.gate`
(judging a candidate and publishing it, shared with ``freshrec eval``), :mod:`.loop`
(the process) and :mod:`.cli` (``freshrec learn``).
"""
