import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from lit_tricks.data import ArrayDataModule
from lit_tricks.functional.dn_cbm import name_directions, probe_l1, resample_dead_neurons, sae_loss
from lit_tricks.functional.vl_embeddings import embed
from lit_tricks.modules.concept_bottleneck.dn_cbm import DNCBM, DNCBMAutoencoder, SparseAutoencoder


def test_sae_loss_by_hand():
    x = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 3.0]])
    x_hat = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 3.0]])
    f = torch.tensor([[0.5, 0.0], [2.0, 1.0]])
    recon, l1 = sae_loss(x, x_hat, f, l1_coeff=0.1)
    # per sample: mean over D of squared errors (4/3, 2/3), then the batch mean; l1: 0.1 * mean(0.5, 3)
    assert recon.item() == pytest.approx((4 / 3 + 2 / 3) / 2)
    assert l1.item() == pytest.approx(0.1 * 1.75)
    assert probe_l1(torch.tensor([[1.0, -2.0], [0.0, 3.0]])).item() == pytest.approx(1.5)


def test_name_directions_by_hand():
    directions = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, -1.0]])
    vocab = torch.tensor([[1.0, 0.0], [0.0, 3.0], [0.6, 0.8]])
    index, sim = name_directions(directions, vocab)
    # cosines: d0 -> (1, 0, 0.6); d1 -> (0.707, 0.707, 0.990); d2 -> (0, -1, -0.8)
    assert index.tolist() == [0, 2, 0]
    assert sim.tolist() == pytest.approx([1.0, 1.4 / 2**0.5, 0.0], abs=1e-6)
    # the code's similarity: unit directions times the vocabulary as stored; the long entry 1 now wins for d1
    assert name_directions(directions, vocab, normalize_vocabulary=False)[0].tolist() == [0, 1, 0]


def test_resample_by_hand():
    inputs = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]])
    alive = torch.tensor([[0.0, 2.0], [4.0, 0.0]])  # mean norm 3 -> encoder rows of norm 0.6
    # only input 0 has a loss, so it is drawn for both dead neurons (with replacement)
    dec, enc = resample_dead_neurons(inputs, torch.tensor([1.0, 0.0, 0.0]), 2, alive)
    assert dec.flatten().tolist() == pytest.approx([0.6, 0.8] * 2)
    assert enc.flatten().tolist() == pytest.approx([0.36, 0.48] * 2)
    # two inputs with a loss, two dead neurons: drawn without replacement, so both appear
    dec, _ = resample_dead_neurons(inputs, torch.tensor([0.0, 1.0, 5.0]), 2, alive)
    assert sorted(dec.tolist()) == [[0.0, 1.0], [1.0, 0.0]]
    assert resample_dead_neurons(inputs, torch.ones(3), 0, alive)[0].shape == (0, 2)


def test_decoder_stays_on_the_sphere():
    torch.manual_seed(0)
    sae = SparseAutoencoder(3, expansion_factor=2)
    f, x_hat = sae(torch.randn(5, 3))
    (x_hat.pow(2).sum() + f.sum()).backward()
    sae.remove_parallel_gradient()
    # the gradient left on each column is orthogonal to it
    assert (sae.decoder.grad * sae.decoder).sum(0).abs().max().item() < 1e-5
    with torch.no_grad():
        sae.decoder.mul_(3.0)
    sae.normalize_decoder()
    assert sae.decoder.norm(dim=0).tolist() == pytest.approx([1.0] * 6)


def _toy(seed=0, n=600, d=8, k=6):
    """Image features made of sparse, positive combinations of k unit 'concept' directions: one of atoms 0-2
    (the class) plus one of atoms 3-5 (independent of the class); the vocabulary holds the atoms' noisy text
    embeddings and four unrelated words."""
    g = torch.Generator().manual_seed(seed)
    atoms = F.normalize(torch.randn(k, d, generator=g), dim=1)
    y = torch.randint(0, 3, (n,), generator=g)
    other = 3 + torch.randint(0, 3, (n,), generator=g)
    coef = 0.5 + torch.rand(n, 2, generator=g)
    x = coef[:, :1] * atoms[y] + coef[:, 1:] * atoms[other] + 0.02 * torch.randn(n, d, generator=g)
    vocab = torch.cat([atoms + 0.05 * torch.randn(k, d, generator=g), torch.randn(4, d, generator=g)])
    return x, y, vocab, [f"atom{i}" for i in range(k)] + [f"word{i}" for i in range(4)]


def test_resampling_revives_dead_neurons_and_resets_adam(quiet_trainer_kwargs):
    x, y, _, _ = _toy()

    class Data(ArrayDataModule):
        num_classes = 3

        def load_arrays(self):
            return x[:500], y[:500], x[500:], y[500:]

    pl.seed_everything(0, verbose=False)
    model = DNCBMAutoencoder(8, expansion_factor=2, lr=1e-2, resample_every=1)
    with torch.no_grad():
        model.sae.encoder.bias[[3, 7]] = -100.0  # never fire
    seen = {}

    class Spy(pl.Callback):
        def on_train_epoch_start(self, trainer, module):  # runs before the module's hook: the state before
            if trainer.current_epoch == 1:
                seen["fires"] = module.fires.clone()
                seen["alive_norm"] = module.sae.encoder.weight[module.fires > 0].norm(dim=1).mean().item()

        def on_train_batch_start(self, trainer, module, batch, batch_idx):  # after the resampling, before a step
            if trainer.current_epoch == 1 and batch_idx == 0:
                seen["bias"] = module.sae.encoder.bias.detach().clone()
                seen["enc_norm"] = module.sae.encoder.weight.detach().norm(dim=1)
                seen["dec"] = module.sae.decoder.detach().clone()
                state = trainer.optimizers[0].state[module.sae.encoder.weight]
                seen["exp_avg"] = state["exp_avg"].clone()

    trainer = pl.Trainer(
        max_epochs=3, limit_train_batches=5, limit_val_batches=0, callbacks=[Spy()], **quiet_trainer_kwargs
    )
    trainer.fit(model, Data(batch_size=50, val_fraction=0.0))
    dead = (seen["fires"] == 0).nonzero().flatten().tolist()
    assert 3 in dead and 7 in dead
    assert seen["bias"][dead].abs().max().item() == 0.0
    assert seen["enc_norm"][dead].tolist() == pytest.approx([0.2 * seen["alive_norm"]] * len(dead), rel=1e-4)
    assert seen["exp_avg"][dead].abs().max().item() == 0.0 and seen["exp_avg"].abs().max().item() > 0
    # each revived decoder direction is a normalised training input
    cos = F.normalize(x[:500], dim=1) @ seen["dec"][:, dead]
    assert cos.max(dim=0).values.tolist() == pytest.approx([1.0] * len(dead), abs=1e-5)
    # epoch 2 is one of the code's final epochs (1 + 1 >= 3 - 1): counted, not resampled
    assert model.fires.sum().item() > 0 and int(model.epochs_since_resample) == 1


def test_no_resampling_in_the_final_epochs(quiet_trainer_kwargs):
    x, y, _, _ = _toy()
    model = DNCBMAutoencoder(8, expansion_factor=2, resample_every=1)
    with torch.no_grad():
        model.sae.encoder.bias[3] = -100.0
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=100)
    # max_epochs 2: after epoch 0, 0 + 1 >= 2 - 1, the code skips it; the dead neuron stays dead
    pl.Trainer(max_epochs=2, **quiet_trainer_kwargs).fit(model, data)
    assert model.sae.encoder.bias[3].item() < -99 and int(model.epochs_since_resample) == 1


def test_real_fit_discovers_names_and_classifies(quiet_trainer_kwargs):
    x, y, vocab, words = _toy()

    class Data(ArrayDataModule):
        num_classes = 3

        def load_arrays(self):
            return x[:500], y[:500], x[500:], y[500:]

    pl.seed_everything(0, verbose=False)
    sae = DNCBMAutoencoder(8, expansion_factor=2, l1_coeff=1e-2, lr=1e-2, resample_every=5)
    start = sae.sae(x)[1].sub(x).pow(2).mean().item()
    pl.Trainer(max_epochs=30, limit_val_batches=0, **quiet_trainer_kwargs).fit(sae, Data(batch_size=50))
    with torch.no_grad():
        f, x_hat = sae.sae(x)
    assert (x - x_hat).pow(2).mean().item() < 0.05 * start
    assert (f > 0).float().sum(1).mean().item() < 8  # sparse: fewer active neurons than input dimensions
    # naming through a text encoder (a lookup of the vocabulary's embeddings by word)
    table = dict(zip(words, vocab, strict=True))
    model = DNCBM.from_autoencoder(
        sae, n_classes=3, vocabulary=words, text_encoder=lambda ws: torch.stack([table[w] for w in ws]), lr=1e-2
    )
    assert torch.equal(model.concept_index, name_directions(sae.sae.decoder.T, vocab)[0])
    assert {f"atom{i}" for i in range(6)} <= set(model.concept_names)  # every concept discovered and named
    best = torch.zeros(6)
    for name, s in zip(model.concept_names, model.name_similarity.tolist(), strict=True):
        if name.startswith("atom"):
            best[int(name[4:])] = max(best[int(name[4:])], s)
    assert best.min().item() > 0.7
    pl.Trainer(max_epochs=20, limit_val_batches=0, **quiet_trainer_kwargs).fit(model, Data(batch_size=50))
    with torch.no_grad():
        assert (model(x[500:]).argmax(1) == y[500:]).float().mean().item() > 0.9
    for c in range(3):  # each class leans on its own concept
        assert f"atom{c}" in [name for name, _ in model.top_concepts(c, 3)]


def test_probe_loss_is_ce_plus_mean_l1():
    sae = SparseAutoencoder(4, expansion_factor=2)
    model = DNCBM.from_autoencoder(sae, torch.randn(5, 4), n_classes=3, sparsity_weight=10.0)
    batch = {"inputs": torch.randn(6, 4), "targets": torch.tensor([0, 1, 2, 0, 1, 2])}
    want = F.cross_entropy(model(batch["inputs"]), batch["targets"]) + 10.0 * model.head.weight.abs().mean()
    model.log_dict = lambda *a, **k: None
    assert model.training_step(batch, 0).item() == pytest.approx(want.item())
    assert model.head.bias is None
    assert model.concept_names[0].startswith("concept_")


def test_names_and_similarities_come_back_from_a_checkpoint(tmp_path, quiet_trainer_kwargs):
    sae = SparseAutoencoder(2, expansion_factor=1)
    with torch.no_grad():
        sae.decoder.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    vocab = torch.tensor([[0.0, 1.0], [1.0, 0.1]])
    model = DNCBM.from_autoencoder(sae, vocab, n_classes=2, vocabulary=["up", "right"])
    assert model.concept_names == ["right", "up"] and model.name_similarity[1].item() == pytest.approx(1.0)
    data = torch.utils.data.DataLoader([{"inputs": torch.randn(2), "targets": 0} for _ in range(4)], batch_size=2)
    trainer = pl.Trainer(max_epochs=1, **quiet_trainer_kwargs)
    trainer.fit(model, data)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    other = DNCBM.from_autoencoder(SparseAutoencoder(2, expansion_factor=1), vocab, n_classes=2)
    other.on_load_checkpoint(torch.load(tmp_path / "m.ckpt", weights_only=False))
    other.load_state_dict(torch.load(tmp_path / "m.ckpt", weights_only=False)["state_dict"])
    assert other.concept_names == ["right", "up"] and torch.equal(other.name_similarity, model.name_similarity)


def test_embed_batches_without_gradients_in_eval_mode():
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Dropout(0.9))  # in training mode
    x = torch.randn(5, 3)
    out = embed(encoder, x, batch_size=2)  # three batches: 2, 2, 1
    assert torch.allclose(out, encoder[0](x).detach(), atol=1e-6) and not out.requires_grad  # eval mode: no dropout
    assert encoder.training and encoder[1].training  # and the flags given back


def test_bad_input():
    sae = SparseAutoencoder(4, expansion_factor=2)
    with pytest.raises(ValueError, match="vocabulary_embeddings must be \\[M, D\\] with M >= 1"):
        DNCBM.from_autoencoder(sae, torch.zeros(0, 4), n_classes=2)
    with pytest.raises(ValueError, match="do not match vocabulary_embeddings"):
        DNCBM.from_autoencoder(sae, torch.randn(5, 3), n_classes=2)
    with pytest.raises(ValueError, match="pass vocabulary_embeddings, or the words"):
        DNCBM.from_autoencoder(sae, n_classes=2, vocabulary=["a"])
    with pytest.raises(ValueError, match="vocabulary has 2 words"):
        DNCBM.from_autoencoder(sae, torch.randn(5, 4), n_classes=2, vocabulary=["a", "b"])
    with pytest.raises(TypeError, match="autoencoder must be"):
        DNCBM.from_autoencoder(torch.nn.Linear(4, 4), torch.randn(5, 4), n_classes=2)
    with pytest.raises(ValueError, match="encoder must return \\[N, D\\]"):
        DNCBM.from_autoencoder(sae, n_classes=2, vocabulary=["a"], text_encoder=lambda ws: torch.zeros(4))
    with pytest.raises(ValueError, match="do not match the SAE's input size"):
        DNCBM.from_autoencoder(sae, torch.randn(5, 4), n_classes=2)(torch.randn(2, 3))
    with pytest.raises(ValueError, match="expansion_factor must be an integer"):
        DNCBMAutoencoder(4, expansion_factor=0)
    with pytest.raises(TypeError, match="expansion_factor must be an integer"):
        DNCBMAutoencoder(4, expansion_factor=1.5)
    with pytest.raises(ValueError, match="l1_coeff must be"):
        DNCBMAutoencoder(4, l1_coeff=-1.0)
    with pytest.raises(ValueError, match="tied_bias must be"):
        DNCBMAutoencoder(4, tied_bias=torch.zeros(3))
    with pytest.raises(ValueError, match="sparsity_weight must be"):
        DNCBM.from_autoencoder(sae, torch.randn(5, 4), n_classes=2, sparsity_weight=-1.0)
    with pytest.raises(ValueError, match="concept_names needs one name per neuron"):
        DNCBM(torch.zeros(4), torch.zeros(8, 4), torch.zeros(8), torch.zeros(8, 4), torch.zeros(8), 2, ["a"])
    with pytest.raises(ValueError, match="features must be \\[N, input_dim\\]"):
        DNCBMAutoencoder(4).training_step(torch.zeros(2, 3), 0)
    with pytest.raises(TypeError, match="encoder must be an nn.Module or a callable"):
        embed("clip", ["a"])
    with pytest.raises(ValueError, match="inputs must not be empty"):
        embed(torch.nn.Identity(), torch.zeros(0, 3))
