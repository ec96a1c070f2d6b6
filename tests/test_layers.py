import pytest
import torch

from diffaudit.families.sd import PAPER_LAYERS
from diffaudit.layers import (UnknownLayerError, expand_layers, from_module_path, layer_segments, parse_segment,
                              resolve_layers, to_module_path)


def test_paper_list_has_45_names_without_up0_res2():
    assert len(PAPER_LAYERS) == 45 and len(set(PAPER_LAYERS)) == 45
    assert "up_blocks[0].resnets[2]" not in PAPER_LAYERS
    assert PAPER_LAYERS[30] == "up_blocks[1].upsamplers[0]" and PAPER_LAYERS[44] == "conv_out"


@pytest.mark.parametrize("name", PAPER_LAYERS)
def test_name_round_trip(name):
    assert from_module_path(to_module_path(name)) == name


@pytest.mark.parametrize("bad", ["__import__('os').system('true')", "conv_in; rm", "a[b]", "up_blocks[1]..x", ""])
def test_malformed_names_are_rejected_not_evaluated(bad):
    with pytest.raises(UnknownLayerError):
        to_module_path(bad)


def test_resolve_walks_modules_and_lists_valid_names():
    net = torch.nn.Module()
    net.blocks = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())])
    net.head = torch.nn.Linear(2, 1)
    got = resolve_layers(net, ["blocks[0]", "head"])
    assert got["head"] is net.head and got["blocks[0]"] is net.blocks[0]
    with pytest.raises(UnknownLayerError) as e:
        resolve_layers(net, ["head", "tail"])
    assert "tail" in str(e.value) and "blocks[0]" in str(e.value)
    with pytest.raises(UnknownLayerError, match="duplicate"):
        resolve_layers(net, ["head", "head"])


def test_expand_layers():
    assert expand_layers("paper", PAPER_LAYERS) == list(PAPER_LAYERS)
    assert expand_layers(["conv_in"]) == ["conv_in"]
    with pytest.raises(UnknownLayerError):
        expand_layers("all_of_them")
    with pytest.raises(UnknownLayerError, match="depends on the model"):
        expand_layers("paper")


def test_the_one_layer_name_parser():
    assert layer_segments("up_blocks[1].attentions[0].proj_out") == [("up_blocks", (1,)), ("attentions", (0,)),
                                                                      ("proj_out", ())]
    assert parse_segment("a[1][2]") == ("a", (1, 2)) and parse_segment("1a") is None
    assert layer_segments("conv_in; rm") is None and layer_segments("up_blocks[1]..x") is None
