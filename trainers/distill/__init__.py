"""Knowledge distillation for DETR-family detectors, written once against the detector contract."""


def build_distillation_loss(config, criterion, num_classes: int, device, bf16_teacher: bool = False,
                            compile_teacher=None):
    """The distillation objective of a trial: loads the frozen teacher named by config.teacher. bf16_teacher
    (bf16 autocast on): the teacher runs on bf16 copies of its weights, made once (BF16Weights).
    compile_teacher (runtime.compile): a function that compiles a model (engine.compile_model); the teacher
    then runs compiled, on autocast alone, whose casts the compiler fuses. runtime.teacher_cuda_graph: its
    forward replayed from CUDA graphs (GraphedTeacher)."""
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
    if compile_teacher is not None:
        teacher = compile_teacher(teacher)
    elif bf16_teacher:
        from trainers.bf16_weights import BF16Weights
        teacher = BF16Weights(teacher, frozen=True)
    if config.runtime.teacher_cuda_graph and compile_teacher is None:
        from trainers.distill.teacher_graph import GraphedTeacher
        teacher = GraphedTeacher(teacher)
    return DistillationLoss(teacher, criterion, config.distill, s_model.hidden_dim, t_model.hidden_dim,
                            s_model.decoder_layers, t_model.decoder_layers, s_model.levels,
                            teacher_thread=config.runtime.overlap_teacher == "thread").to(device)
