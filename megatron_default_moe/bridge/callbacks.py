"""Default MoE's per-step work in Megatron-Bridge's training loop, as a Bridge callback.

Bridge's ``train()`` fires ``on_train_step_end`` once per optimizer step on every rank, after
all micro-batches' backward and the optimizer step, and before that step's checkpoint is saved.
There ``DefaultMoECallback`` runs ``update_default_vectors`` (``update="step"``: one bucketed
all-reduce and one EMA step; in both modes the NaN/Inf-skip warning) and, every
``log_interval`` steps, writes the Default MoE metrics (``megatron_default_moe.analysis.metrics``) through
Bridge's TensorBoard / W&B writers. ``on_train_step_start`` turns on the metric tracking of the
forward and backward of a step that will be logged.

Bridge's ``CallbackManager.add`` takes any object with ``on_<event>`` methods, so this class
needs no Bridge import: ``pretrain(cfg, forward_step, callbacks=[DefaultMoECallback()])``.
"""

from megatron_default_moe.analysis.metrics import log_default_moe_metrics
from megatron_default_moe.update import default_moe_layers, update_default_vectors


class DefaultMoECallback:
    """``update="step"`` EMA step and Default MoE metrics in Bridge's ``pretrain`` / ``finetune``.

    Args:
        log_interval: steps between metric writes; ``None`` takes Bridge's
            ``cfg.logger.log_interval``; 0 writes none (the step update still runs).
    """

    def __init__(self, log_interval: int | None = None):
        self.log_interval = log_interval
        self.layers = []

    def _logs(self, context, step: int) -> bool:
        interval = self.log_interval
        if interval is None:
            interval = context.state.cfg.logger.log_interval
        return bool(interval) and step % interval == 0

    def on_train_start(self, context) -> None:
        from megatron.core.utils import get_model_config

        self.layers = default_moe_layers(context.model)
        if not self.layers:
            raise ValueError(
                "DefaultMoECallback: the model has no Default MoE layers; call "
                "megatron_default_moe.bridge.enable_default_moe(cfg.model) before pretrain()"
            )
        finalize = get_model_config(context.model[0]).finalize_model_grads_func
        if getattr(finalize, "_default_moe_wrapped", False):
            raise ValueError(
                "DefaultMoECallback: finalize_model_grads_func already updates the default vectors "
                "(wrap_finalize_model_grads / install_training_hooks); use one or the other"
            )

    def on_train_step_start(self, context) -> None:
        tracks = self._logs(context, context.state.train_state.step + 1)
        for layer in self.layers:
            layer.track_metrics = tracks

    def on_train_step_end(self, context) -> None:
        update_default_vectors(context.model)
        step = context.state.train_state.step + 1  # Bridge counts the step after this event
        if self._logs(context, step):
            state = context.state
            log_default_moe_metrics(context.model, step, state.tensorboard_logger, state.wandb_logger)
