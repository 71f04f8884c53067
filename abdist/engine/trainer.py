"""The training loop: one function, read top to bottom.

    setup (seed, data, model, method, optimiser) -> resume from the latest checkpoint if any ->
    for each epoch: train on shuffled batches, evaluate on validation, log, checkpoint ->
    evaluate the selected weights on test -> metrics.json + alpha.json

Resume is exact because every source of randomness is either restored from the checkpoint (global
RNGs, optimiser and schedule state) or derived from (seed, epoch) alone (batch order, augmentation).

The same function runs on every rank of a torchrun / Slurm job (dist.backend=ddp|deepspeed): the
distributed details live in abdist.engine.dist (`dist` = where this rank is and its collectives,
`engine` = the wrapped model's forward/backward/step). Each rank trains on its slice of every
global batch, evaluates its slice of each split (confusion matrices summed), and only rank 0
writes files.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any

import torch

from abdist import methods
from abdist.config import Config
from abdist.config_checks import check_positive_class
from abdist.data import build_augment, build_data
from abdist.engine.checkpoint import CheckpointDir, rng_state, set_rng_state
from abdist.engine.dist import init_dist, sync_batchnorm, wrap
from abdist.engine.evaluation import BadSampleTally, evaluate
from abdist.engine.init_from import load_init_weights
from abdist.engine.optim import build_optimizer, lr_factor
from abdist.engine.routing import loss_through
from abdist.engine.rundir import check_out_dir, check_resumable, resume_state
from abdist.errors import UserError
from abdist.group_metrics import group_confusion_metrics
from abdist.io import write_json, write_text
from abdist.losses import build_loss_spec
from abdist.methods import Batch, Phase, SetupContext
from abdist.methods.sample_weights import sample_weights_for
from abdist.metrics import GROUP_SCALAR_METRICS, class_metrics
from abdist.models import create_model
from abdist.tracking import JsonlLogger, progress
from abdist.wandb_tracking import make_tracker


class TrainingDiverged(UserError):
    """The loss became NaN/inf; the last good checkpoint is kept. Not a traceback: a clear line."""

    exit_code = 3


# --- setup helpers ------------------------------------------------------------------------------


def _autocast(cfg: Config, device: torch.device):
    if cfg.train.precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    # Batch order and augmentation depend on (seed, epoch) only: nothing to save for exact resume.
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


# --- the loop -----------------------------------------------------------------------------------


def train(
    cfg: Config,
    run_dir: str | Path,
    *,
    phase: Phase | None = None,
    inputs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train (or resume) one phase of the run in `run_dir`; return the test metrics also written
    to disk. `phase` (abdist.methods.Phase): which of the method's phases (default: a plain one);
    `inputs`: the artifacts of the phase it reads (`phase.inputs_from`).
    """
    run_dir = Path(run_dir)
    phase = phase or Phase("train")
    dist = init_dist(cfg)  # torchrun / Slurm / one process; the process group; this rank's device
    dist.check_same_config(cfg.to_dict(), str(run_dir))
    check_out_dir(run_dir)
    check_resumable(run_dir, cfg)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text(run_dir / "config.yaml", cfg.to_yaml())

    if cfg.train.threads:
        torch.set_num_threads(dist.threads(cfg.train.threads))
    torch.use_deterministic_algorithms(cfg.train.deterministic, warn_only=True)
    torch.manual_seed(cfg.train.seed)  # the same on every rank: identical model initialisation
    device = dist.device
    autocast = _autocast(cfg, device)

    data = build_data(cfg.data, dist.rank, dist.world_size)  # streamed shards: per rank
    if phase.merge_val or cfg.train.merge_val:
        data = data.with_val_merged()
    model = create_model(
        cfg.model.name,
        num_classes=data.num_classes,
        in_channels=data.in_channels,
        image_size=data.image_size,
        head=cfg.model.head,
    )
    # Fine-tuning: the weights of an earlier run (strict); optimiser and schedule start fresh.
    init = load_init_weights(model, cfg.model.init_from) if cfg.model.init_from else None
    model = model.to(device)
    if cfg.dist.sync_bn and dist.world_size > 1:
        model = sync_batchnorm(model, device)
    torch.manual_seed(cfg.train.seed + dist.rank)  # per-rank stream for anything drawn from here on
    lc = cfg.loss
    spec = build_loss_spec(
        lc.name,
        data.class_counts,
        tau=lc.tau,
        gamma=lc.gamma,
        ldam_max_margin=lc.ldam_max_margin,
        ldam_scale=lc.ldam_scale,
        drw_epoch=lc.drw_epoch,
        drw_beta=lc.drw_beta,
    )
    augment = build_augment(cfg.data, data, cfg.train.seed)  # abdist/data/augment.py
    ctx = SetupContext(
        cfg, data, model, spec, augment, device, dist, phase, inputs or {}, init or {}
    )
    method = methods.get(cfg.method.name).build(ctx)
    augment = method.train_augment()
    table = getattr(augment, "table", None)  # the class-aware chain's per-class strengths
    groups_of = getattr(method, "param_groups", None)  # e.g. SelMix: a smaller backbone lr
    optimizer = build_optimizer(groups_of(model) if groups_of else model.parameters(), cfg.optim)

    B, accum = cfg.train.batch_size, cfg.train.grad_accum  # B is the global batch
    engine = wrap(model, optimizer, dist, cfg, micro_batch=dist.local_batch(B))
    batches_per_epoch = data.train.num_batches(B, drop_last=True) or 1
    steps_per_epoch = math.ceil(batches_per_epoch / accum)
    total_steps = steps_per_epoch * cfg.train.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_factor(
            s, total_steps=total_steps, steps_per_epoch=steps_per_epoch, optim_cfg=cfg.optim
        ),
    )

    ckpts = CheckpointDir(
        run_dir / "checkpoints", keep=cfg.train.keep_checkpoints, writer=dist.is_main
    )
    # log.jsonl stays the durable record with wandb too (the resume logic trims it).
    jsonl = cfg.tracking.backend in ("jsonl", "wandb") and dist.is_main
    log = JsonlLogger(run_dir / "log.jsonl" if jsonl else None)
    start_epoch, best = 0, {"epoch": -1, "val_balanced_error": math.inf}
    best_weights = None
    state = resume_state(ckpts, run_dir, verbose=dist.is_main)  # never a silent restart
    if state is not None:
        engine.load_state_dict(state, ckpts.root)  # model + optimiser (DeepSpeed: its own files)
        scheduler.load_state_dict(state["scheduler"])
        if table is not None and "augment" in state:
            table.load_state_dict(state["augment"])  # the versions resumed batches use
        method.load_state_dict(state["method"])
        set_rng_state(dist.pick_rng(state["rng"]))
        start_epoch, best = state["epoch"] + 1, state["best"]
        best_weights = state.get("best_weights")
        log.truncate_after(start_epoch)  # log epochs are 1-based: keep the finished ones
        if dist.is_main:
            print(f"resuming {run_dir} from epoch {start_epoch}")
    else:
        log.truncate_after(0)
    tracker = make_tracker(cfg, run_dir, rank=dist.rank)  # W&B on rank 0, else a no-op

    # Evaluation: every rank scores its own slice of the split; the confusion matrices are summed,
    # so each sample counts exactly once. The bare module: no gradient sync, uneven slices are fine.
    # Group attributes (shards prepared with --groups): fairness metrics as well.
    num_groups = data.num_groups
    positive_class = check_positive_class(cfg, data.num_classes) if num_groups else None

    def evaluate_split(split):
        """(class confusion [C, C], group metrics or None), summed over ranks."""
        conf = evaluate(
            engine.module,
            split.shard(dist.rank, dist.world_size),
            num_classes=data.num_classes,
            batch_size=cfg.train.eval_batch_size,
            device=device,
            autocast=autocast,
            num_groups=num_groups,
        )
        conf = dist.all_reduce_sum(conf)
        if num_groups is None:
            return conf, None
        return conf.sum(0), group_confusion_metrics(conf, positive_class)

    bad = BadSampleTally(data, dist)
    weigh = sample_weights_for(method, cfg, data)  # loss.sample_weights: per-sample weights
    with_ids = "ids" in method.needs
    with_groups = "groups" in method.needs or (weigh is not None and weigh.needs_groups)
    own_batches = getattr(method, "train_batches", None)
    step = start_epoch * steps_per_epoch
    if table is not None:  # batches are numbered from here (abdist/data/augment_table.py)
        table.publish(start_epoch * batches_per_epoch - 1)
    val_conf = None  # the last epoch's validation confusion (a method's summary reads it)
    for epoch in range(start_epoch, cfg.train.epochs):
        t0 = time.perf_counter()
        engine.model.train()
        method.on_epoch_start(epoch)
        gen = _epoch_generator(cfg.train.seed, epoch)
        if own_batches is not None:  # the method draws its own (SelMix: by class)
            batches = own_batches(
                batch_size=B,
                generator=gen,
                augment=augment,
                rank=dist.rank,
                world_size=dist.world_size,
                first_batch=epoch * batches_per_epoch,
            )
        else:
            batches = data.train.batches(
                B,
                shuffle=True,
                generator=gen,
                drop_last=True,
                augment=augment,
                rank=dist.rank,  # this rank's slice of every global batch of B
                world_size=dist.world_size,
                with_groups=with_groups,  # per-cell loss parameters, group-balanced weights
                with_ids=with_ids,
                first_batch=epoch * batches_per_epoch,  # the chain's table version and generator
            )
        total_loss, seen, hyper = 0.0, 0, {}
        engine.zero_grad()
        bar = progress(
            batches,
            total=batches_per_epoch,
            desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
            mode=cfg.tracking.progress if dist.is_main else "never",
        )
        for i, fields in enumerate(bar):
            if isinstance(fields, Batch):  # from the method's own train_batches
                batch = fields.to(device)
            else:
                x, y, *rest = fields  # then ids, groups: what was asked for, in that order
                ids = rest.pop(0) if with_ids else None
                groups = rest.pop(0) if with_groups else None
                weights = weigh(y, groups) if weigh is not None else None
                batch = Batch(x, y, groups, ids, weights).to(device)
            last_micro = (i + 1) % accum == 0 or i + 1 == batches_per_epoch
            with engine.grad_sync(last_micro):
                with autocast:
                    # Inside the wrapper's forward: whatever the loss reaches is all-reduced.
                    loss = loss_through(
                        engine.model, engine.module, lambda m, b=batch: method.training_loss(m, b)
                    )
                if not torch.isfinite(loss):
                    last = ckpts.latest()
                    kept = f"last good checkpoint kept at {last}" if last else "no checkpoint yet"
                    raise TrainingDiverged(
                        f"non-finite training loss ({loss.item()}) at epoch {epoch + 1}, "
                        f"batch {i + 1}; "
                        f"{kept}; lower optim.lr or use train.precision=fp32"
                    )
                engine.backward(loss / accum)
            total_loss += loss.item() * len(batch.y)
            seen += len(batch.y)
            bar.set_loss(total_loss / seen)  # running training loss next to the bar
            if last_micro:
                method.before_step(step, engine.module, optimizer.param_groups[0]["lr"])
                engine.step()
                scheduler.step()
                # The hyper step differentiates twice: on the bare module, never through DDP.
                hyper = method.after_step(step, engine.module) or hyper
                step += 1
            if table is not None:  # changes made up to here are labelled with this batch
                table.publish(epoch * batches_per_epoch + i)

        bar.set_phase("evaluating")
        engine.sync_buffers()  # BatchNorm statistics: the same on every rank before eval/save
        record = {
            "epoch": epoch + 1,
            "step": step,
            "lr": optimizer.param_groups[0]["lr"],
            "train_loss": dist.mean_over_samples(total_loss, seen),
        }
        record.update({f"last_{k}": v for k, v in hyper.items()})
        val = None
        if len(data.val):
            val_conf, val_groups = evaluate_split(data.val)
            val = class_metrics(val_conf)
            record.update(
                val_accuracy=val["accuracy"],
                val_balanced_error=val["balanced_error"],
                val_worst_class_recall=val["worst_class_recall"],
            )
            if val_groups is not None:
                record["val_equal_opportunity_gap"] = val_groups["equal_opportunity_gap"]
        record.update(bad.since_last())  # streamed shards: skipped in this epoch's passes
        record["seconds"] = round(time.perf_counter() - t0, 3)
        log.log(record)
        bar.close(record)  # the bar gives way to one line per epoch that stays
        tracker.log(record)
        if val is not None and val["balanced_error"] < best["val_balanced_error"]:
            best = {"epoch": epoch, "val_balanced_error": val["balanced_error"]}
            if cfg.train.select == "best_val":
                # Kept inside the checkpoint, so the best weights and the epoch they came from are
                # always written together (a kill between two files could not desync them).
                best_weights = {
                    k: v.detach().clone() for k, v in engine.module.state_dict().items()
                }
        ckpts.save(
            epoch,
            {
                "epoch": epoch,
                **engine.state_dict(ckpts.root, epoch),
                "scheduler": scheduler.state_dict(),
                "method": method.state_dict(),
                **({"augment": table.state_dict()} if table is not None else {}),
                "rng": dist.all_gather_object(rng_state()),  # every rank's own stream
                "best": best,
                "best_weights": best_weights,
            },
        )

    if cfg.train.select == "best_val" and best_weights is not None:
        engine.module.load_state_dict(best_weights)
    bad.since_last()  # what training and validation skipped is in the epochs' records
    test_conf, test_groups = evaluate_split(data.test)
    metrics = class_metrics(
        test_conf,
        class_counts=data.class_counts,
        many_shot_min=cfg.train.many_shot_min,
        few_shot_max=cfg.train.few_shot_max,
    )
    metrics.update(
        name=cfg.train.name,
        method=f"{method.name}/{cfg.loss.name}",
        class_counts=list(data.class_counts),
        class_names=list(data.class_names),
        selected_epoch=(best["epoch"] if cfg.train.select == "best_val" else cfg.train.epochs - 1)
        + 1,
        confusion_matrix=test_conf.tolist(),
    )
    if init is not None:
        metrics["init_from"] = init  # which weights it started from (path, epoch, sha256)
    summary = getattr(method, "summary", None)  # e.g. SelMix: its objective before and after
    if summary is not None:
        metrics.update(summary(val_conf, test_conf))
    if test_groups is not None:
        metrics.update({k: test_groups[k] for k in GROUP_SCALAR_METRICS})
        metrics["groups"] = {"positive_class": positive_class, **test_groups}
    metrics.update(bad.since_last())  # skipped in the test pass
    artifacts = method.artifacts()
    if dist.is_main:
        for name, content in artifacts.items():
            write_json(run_dir / name, content)
        write_json(run_dir / "metrics.json", metrics)
        tracker.log_summary(metrics, artifacts.get("alpha.json"))
    tracker.finish()
    dist.barrier()  # no rank leaves before rank 0's files exist (a retrain reads alpha.json)
    return metrics
