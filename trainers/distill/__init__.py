"""Knowledge distillation for DETR-family detectors, written once against the detector contract."""


def build_distillation_loss(config, criterion, categories: list[str], device, amp: bool = False):
    """The distillation objective of a trial: loads the frozen teacher named by config.teacher, which runs as
    accel.wrap_teacher makes it (config.runtime; amp: bf16 autocast on). categories: the dataset's category
    names in label order; a pretrained transformers teacher's classes are put in that order by name."""
    from trainers import accel
    from trainers.checkpoint import align_classes, load_detector
    from trainers.distill.objective import DistillationLoss
    if config.teacher is None or config.teacher.checkpoint is None:
        raise ValueError(f"trial {config.name!r}: distill.method={config.distill.method!r} needs "
                         "teacher.checkpoint (a trained teacher)")
    teacher, meta = load_detector(config.teacher.checkpoint)
    if meta.get("label_names") is not None:
        teacher = align_classes(teacher, meta["label_names"], list(categories), config.teacher.label_map,
                                f"trial {config.name!r}: teacher {config.teacher.checkpoint}")
    if teacher.num_classes != len(categories):
        raise ValueError(f"teacher {config.teacher.checkpoint} predicts {teacher.num_classes} classes, the data has "
                         f"{len(categories)}")
    s_model, t_model = config.model, teacher.config
    return DistillationLoss(accel.wrap_teacher(teacher, config.runtime, amp), criterion, config.distill,
                            s_model.hidden_dim, t_model.hidden_dim, s_model.decoder_layers, t_model.decoder_layers,
                            s_model.levels).to(device)
