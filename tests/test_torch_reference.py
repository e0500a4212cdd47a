"""The PyTorch baseline (benchmarks/torch_reference.py) is the same function as our CliqueNet:
same parameter count, same logits in inference and training mode. Torch is optional
(requirements-bench.txt), so without it these tests are skipped."""

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from benchmarks import torch_reference as ref  # noqa: E402


def our_param_count(k, T, num_classes=10):
    model = ref.build_ours(k, T, num_classes)
    images = np.zeros((1, 32, 32, 3), np.float32)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)
    return sum(leaf.size for leaf in jax.tree.leaves(variables["params"]))


@pytest.mark.parametrize("k,T", [(36, 12), (4, 6), (4, 7), (5, 9)])
def test_param_count_equals_ours(k, T):
    assert ref.TorchCliqueNet(k, T, 10).count_params() == our_param_count(k, T)


def test_published_param_count():
    assert ref.TorchCliqueNet(36, 12, 10).count_params() == 935_994


@pytest.mark.parametrize("k,T,batch", [(4, 6, 4), (5, 9, 3), (36, 12, 2)])
def test_logits_equal_ours(k, T, batch):
    differences = ref.check_equal_logits(k, T, batch)
    assert set(differences) == {"inference", "training"}
    assert max(differences.values()) < 1e-4


def test_too_few_layers_is_an_error():
    with pytest.raises(ValueError, match="T >= 6"):
        ref.TorchCliqueNet(4, 5, 10)


@pytest.mark.parametrize("mode", ref.MODES)
def test_train_step_updates_weights(mode):
    torch.manual_seed(0)
    model = ref.TorchCliqueNet(4, 6, 10)
    before = model.classifier.weight.detach().clone()
    step = ref.make_train_step(model, mode)
    images, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    losses = [step(images, labels) for _ in range(2)]
    assert all(np.isfinite(losses))
    assert not torch.equal(before, model.classifier.weight)


def test_unknown_mode_is_an_error():
    with pytest.raises(ValueError, match="allowed"):
        ref.make_train_step(ref.TorchCliqueNet(4, 6, 10), "fp16")
