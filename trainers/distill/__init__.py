"""Knowledge distillation for DETR-family detectors, written once against the detector contract."""


def build_distillation_loss(config, criterion, num_classes: int, device, amp: bool = False):
    """The distillation objective of a trial: loads the frozen teacher named by config.teacher, which runs as
    accel.wrap_teacher makes it (config.runtime; amp: bf16 autocast on)."""
    from trainers import accel
    from trainers.checkpoint import load_detector
    from trainers.distill.objective import DistillationLoss
    if config.teacher is None or config.teacher.checkpoint is None:
        raise ValueError(f"trial {config.name!r}: distill.method={config.distill.method!r} needs "
                         "teacher.checkpoint (a trained teacher)")
    teacher, meta = load_detector(config.teacher.checkpoint)
    t_classes = teacher.num_classes
    if t_classes != num_classes:
        raise ValueError(f"teacher {config.teacher.checkpoint} predicts {t_classes} classes, the data has "
                         f"{num_classes}")
    s_model, t_model = config.model, teacher.config
    return DistillationLoss(accel.wrap_teacher(teacher, config.runtime, amp), criterion, config.distill,
                            s_model.hidden_dim, t_model.hidden_dim, s_model.decoder_layers, t_model.decoder_layers,
                            s_model.levels).to(device)
