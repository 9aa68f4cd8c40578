"""build_model: every architecture, both channel counts, clear errors."""

from typing import get_args

import pytest
import torch

from components.config import ModelName
from components.errors import VisionflowError
from components.models import MODELS, ModelSpec, build_model
from tests.helpers.network import offline


def test_model_table_covers_exactly_the_config_names():
    assert set(MODELS) == set(get_args(ModelName))


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("channels", [1, 3])
def test_every_model_gives_logits(name, channels):
    model = build_model(ModelSpec(name=name, num_classes=7, in_channels=channels, image_size=32)).eval()
    with torch.no_grad():
        assert model(torch.randn(2, channels, 32, 32)).shape == (2, 7)


def test_small_cnn_is_the_seed_article_network():
    model = build_model(ModelSpec(name="cnn", num_classes=10, image_size=32, dropout=0.5))
    convs = [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    linears = [m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert convs == [32, 64] and linears == [128, 10]
    assert any(isinstance(m, torch.nn.Dropout) and m.p == 0.5 for m in model.modules())


def test_unknown_model_and_bad_size():
    with pytest.raises(VisionflowError, match="unknown model"):
        build_model(ModelSpec(name="vgg", num_classes=2))
    with pytest.raises(VisionflowError, match="multiple of 4"):
        build_model(ModelSpec(name="cnn", num_classes=2, image_size=30))


def test_offline_refuses_a_server_that_answers(monkeypatch):
    import http.server
    import threading
    import urllib.error
    import urllib.request

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        with monkeypatch.context() as online:
            for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
                online.delenv(name, raising=False)
            online.setattr(urllib.request, "_opener", None)
            assert urllib.request.urlopen(url, timeout=10).status == 200  # it answers
        offline(monkeypatch)
        with pytest.raises(urllib.error.URLError, match="Connection refused"):
            urllib.request.urlopen(url, timeout=10)
    finally:
        server.shutdown()
        server.server_close()


def test_pretrained_weights_offline_is_one_clear_line(monkeypatch, tmp_path):
    offline(monkeypatch)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # nothing cached: a download is attempted and fails offline
    with pytest.raises(VisionflowError) as info:
        build_model(ModelSpec(name="mobilenet_v3_small", num_classes=2, pretrained=True))
    assert "pretrained weights for mobilenet_v3_small are not cached and could not be downloaded" in str(info.value)
    assert "place mobilenet_v3_small-047dcff4.pth" in str(info.value)
