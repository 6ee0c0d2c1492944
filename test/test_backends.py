"""ONNX export per cascade stage, the ONNX Runtime backend and backend selection."""

from __future__ import annotations

import importlib.util
import json
import platform
import re
import shutil
import sys

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from ttspec_ros import cli
from ttspec_ros.backends import (
    BackendUnavailable,
    create_backbone,
    require_torch_for_strategy,
)
from ttspec_ros.backends.onnx_export import (
    EXPORT_VERSION,
    backbone_hash,
    ensure_exported,
    export_stages,
    image_shape_for,
    load_manifest,
    relative_difference,
)
from ttspec_ros.backends.onnxruntime_backend import OnnxRuntimeBackbone, _keep_carries_blocked
from ttspec_ros.cascade import Cascade, TorchBackbone
from ttspec_ros.models.checkpoint import ModelCard, save_model
from ttspec_ros.models.revcol import RevCol

SIZE = 32
STATES = ["c0", "c1", "c2", "c3"]
X86 = platform.machine().lower() in ("x86_64", "amd64")


def trained_like(model: RevCol) -> RevCol:
    """Trained-like scales: at init (layer scale 1e-6) blocks are near-identities and a backend
    mismatch inside them would hardly show in the outputs."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".gamma"):
                p.normal_(1.0, 0.2)
            else:
                p.add_(0.05 * torch.randn_like(p))
    return model


def make_tiny_model(seed: int = 0) -> RevCol:
    torch.manual_seed(seed)
    model = RevCol((8, 16, 24, 32), (1, 1, 1, 1), 4, 10, in_chans=1, with_decoders=False)
    return trained_like(model).eval()


def torch_reference(model: RevCol, image: torch.Tensor) -> list[torch.Tensor]:
    """Pooled head input of every exit, straight from the model's own stage API."""
    with torch.no_grad():
        x = model.stem(image)
        state = (0.0, 0.0, 0.0, 0.0)
        pooled = []
        for i in range(model.num_exits):
            state = model.run_exit(i, x, state)
            pooled.append(model.pool(state[3]))
    return pooled


def save_tiny_checkpoint(model: RevCol, stem) -> None:
    card = ModelCard(
        model_id="tiny-test", architecture=model.config.to_dict(),
        class_names=[f"c{i}" for i in range(10)],
        input={"channels": 1, "size": SIZE, "content_size": 28, "mean": [0.5], "std": [0.5]},
        thresholds=[0.5, 0.5, 0.5], exit_cost=[0.25, 0.5, 0.75, 1.0],
    )
    save_model(model, card, stem)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.set_num_threads(1)
    model = make_tiny_model()
    stem = tmp_path_factory.mktemp("model") / "tiny"
    save_tiny_checkpoint(model, stem)
    return model, stem


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    """Graphs written by `ttspec export-onnx` for the tiny checkpoint."""
    model, stem = checkpoint
    out = tmp_path_factory.mktemp("graphs")
    assert cli.main(["export-onnx", "--model", str(stem), "--out", str(out)]) == 0
    return model, out, load_manifest(out)


@pytest.fixture()
def image():
    return torch.randn(1, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(7))


def _graph_io(path):
    graph = onnx.load(str(path)).graph

    def dims(values):
        return {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in values}

    return dims(graph.input), dims(graph.output)


def test_manifest_describes_checked_static_graphs(exported):
    model, out, manifest = exported
    assert manifest == json.loads((out / "manifest.json").read_text())
    assert manifest["opset"] == 17 and manifest["num_stages"] == 4
    assert manifest["model_hash"] == backbone_hash(model)
    assert set(manifest["versions"]) == {"torch", "onnx", "onnxruntime"}
    for entry in [*manifest["stages"], manifest["unsplit"]]:
        onnx.checker.check_model(str(out / entry["file"]), full_check=True)
        inputs, outputs = _graph_io(out / entry["file"])
        assert inputs == {i["name"]: i["shape"] for i in entry["inputs"]}
        assert outputs == {o["name"]: o["shape"] for o in entry["outputs"]}
    first, later = manifest["stages"][0], manifest["stages"][1]
    assert [i["name"] for i in first["inputs"]] == ["image"]
    assert [o["name"] for o in first["outputs"]] == ["x", "c0", "c1", "c2", "c3", "pooled"]
    assert [i["name"] for i in later["inputs"]] == ["x", "c0_in", "c1_in", "c2_in", "c3_in"]
    assert first["outputs"][-1]["shape"] == [1, 32]
    # No head parameters in any graph: heads stay in torch and stay updatable.
    for entry in manifest["stages"]:
        names = {t.name for t in onnx.load(str(out / entry["file"])).graph.initializer}
        assert not any("cls_blocks" in n for n in names)


def test_model_hash_covers_backbone_not_heads():
    model = make_tiny_model()
    before = backbone_hash(model)
    with torch.no_grad():
        model.cls_blocks[0].classifier[1].weight.add_(1.0)
        assert backbone_hash(model) == before
        model.subnet1.alpha2.add_(0.25)
    assert backbone_hash(model) != before


def test_onnxruntime_stages_match_torch(exported, image):
    model, out, _ = exported
    backbone = OnnxRuntimeBackbone(out, num_threads=1)
    carry = image[0]  # (C, H, W) is accepted as batch 1
    for i, expected in enumerate(torch_reference(model, image)):
        carry, pooled = backbone.run_stage(i, carry)
        assert pooled.shape == (1, 32)
        assert relative_difference(pooled, expected) < 1e-4
        with torch.no_grad():
            assert relative_difference(model.head(i, pooled), model.head(i, expected)) < 1e-4
    assert carry is None  # nothing follows the last stage: its graph outputs no carry
    assert [o["name"] for o in backbone.manifest["stages"][-1]["outputs"]] == ["pooled"]
    assert relative_difference(backbone.run_unsplit(image), expected) < 1e-4


@pytest.mark.parametrize("stem", [{"stem_kernel": 8}, {"stem_width": 16}])
def test_onnxruntime_matches_torch_with_blocked_layout_and_two_columns_per_stage(tmp_path, stem):
    """Channels that are multiples of 16 (ONNX Runtime runs these convs in its NCHWc layout,
    unlike most of the tiny model's), two columns per stage, an overlapping (padded) stem or
    the conv stem, and alphas the model clamps (tiny, negative, zero) on the way."""
    torch.manual_seed(3)
    model = trained_like(RevCol((16, 32, 48, 64), (1, 1, 1, 1), 8, 10, in_chans=3,
                                with_decoders=False, **stem))
    with torch.no_grad():
        model.subnet1.alpha0[0, :3, 0, 0] = torch.tensor([1e-5, -0.3, 0.0])
        model.subnet5.alpha3[0, :2, 0, 0] = torch.tensor([-1e-4, -0.7])
    model.eval()
    export_stages(model, 64, tmp_path, include_unsplit=False)
    image = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    backbone = OnnxRuntimeBackbone(tmp_path, num_threads=1)
    if X86:  # every carry's channels are a multiple of 16: all cross boundaries blocked
        assert backbone.blocked_carries == [["x", *STATES], STATES, STATES, []]
    carry = image
    for i, expected in enumerate(torch_reference(model, image)):
        carry, pooled = backbone.run_stage(i, carry)
        assert relative_difference(pooled, expected) < 1e-4


@pytest.mark.skipif(not X86, reason="ONNX Runtime's blocked NCHWc layout is for x86 CPUs only")
def test_onnxruntime_keeps_carries_of_other_channel_counts_nchw(exported, image):
    """The tiny model's x, c0 (8 channels) and c2 (24) are not a multiple of every block size:
    they keep their reorders and cross as NCHW, beside blocked c1 and c3 (16, 32 channels)."""
    model, out, _ = exported
    backbone = OnnxRuntimeBackbone(out, num_threads=1)
    assert backbone.blocked_carries == [["c1", "c3"]] * 3 + [[]]
    carry = image
    for i, expected in enumerate(torch_reference(model, image)):
        carry, pooled = backbone.run_stage(i, carry)
        assert relative_difference(pooled, expected) < 1e-4


def _reorder_graph(inputs: list[str], outputs: list[str], plain_readers=()) -> onnx.ModelProto:
    """A stand-in for an optimised stage graph: each input enters the blocked layout through a
    ReorderInput, each output leaves it through a ReorderOutput of 16 channels; inputs and
    outputs in ``plain_readers`` are also read (as NCHW) by a plain node of the graph."""
    nchwc, nodes = "com.microsoft.nchwc", []
    for name in inputs:
        nodes.append(onnx.helper.make_node("ReorderInput", [name], [f"{name}_b"], domain=nchwc))
    for name in outputs:
        source = f"{inputs[0]}_b" if inputs else "image"
        nodes.append(onnx.helper.make_node("Conv", [source], [f"{name}_b"], domain=nchwc))
        nodes.append(onnx.helper.make_node("ReorderOutput", [f"{name}_b"], [name],
                                           domain=nchwc, channels=16))
    for name in plain_readers:
        nodes.append(onnx.helper.make_node("Relu", [name], [f"{name}_plain"]))
    info = [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [1, 16, 4, 4])
            for n in (inputs or ["image"])]
    outs = [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [1, 16, 4, 4])
            for n in outputs]
    opsets = [onnx.helper.make_opsetid("", 17), onnx.helper.make_opsetid(nchwc, 1)]
    return onnx.helper.make_model(onnx.helper.make_graph(nodes, "stage", info, outs),
                                  opset_imports=opsets)


def test_carries_stay_blocked_only_where_every_side_can_drop_its_reorder():
    """A carry read by anything besides its ReorderInput (stage 1's c2_in, stage 2's x), or
    whose NCHW form the making stage reads too (stage 1's c1), keeps NCHW on both sides; the
    others lose both reorders and their nodes read the carry itself."""
    carry_in = ["x", *(f"{n}_in" for n in STATES)]
    graphs = [_reorder_graph([], ["x", *STATES]),
              _reorder_graph(carry_in, STATES, plain_readers={"c2_in", "c1"}),
              _reorder_graph(carry_in, [], plain_readers={"x"})]
    assert _keep_carries_blocked(graphs) == [["c0", "c1", "c3"], ["c0", "c2", "c3"], []]

    def reorders(graph):
        return sorted((n.op_type, (n.output if n.op_type == "ReorderOutput" else n.input)[0])
                      for n in graph.graph.node if n.op_type.startswith("Reorder"))

    assert reorders(graphs[0]) == [("ReorderOutput", "c2"), ("ReorderOutput", "x")]
    assert reorders(graphs[1]) == [("ReorderInput", "c2_in"), ("ReorderInput", "x"),
                                   ("ReorderOutput", "c1")]
    assert reorders(graphs[2]) == [("ReorderInput", "c1_in"), ("ReorderInput", "x")]
    stage1_convs = {n.output[0] for n in graphs[1].graph.node if n.op_type == "Conv"}
    assert stage1_convs == {"c0", "c1_b", "c2", "c3"}  # blocked outputs are made in place
    for graph in graphs:
        onnx.checker.check_model(graph)  # still a well-formed graph


def test_onnxruntime_stage_accepts_a_carry_in_other_buffers(exported, image):
    """Stages read their own previous stage's output buffers in place; a carry held in other
    OrtValues is bound instead, and the next frame's own carry is bound back."""
    import numpy as np
    import onnxruntime as ort

    model, out, _ = exported
    backbone = OnnxRuntimeBackbone(out, num_threads=1)
    expected = torch_reference(model, image)
    carry, _ = backbone.run_stage(0, image)
    copied = {k: ort.OrtValue.ortvalue_from_numpy(np.array(v.numpy())) for k, v in carry.items()}
    other = torch.randn(image.shape, generator=torch.Generator().manual_seed(11))
    backbone.run_stage(0, other)  # overwrites the stage-0 buffers `carry` points to
    _, pooled = backbone.run_stage(1, copied)
    assert relative_difference(pooled, expected[1]) < 1e-4
    carry, _ = backbone.run_stage(0, image)
    _, pooled = backbone.run_stage(1, carry)
    assert relative_difference(pooled, expected[1]) < 1e-4


def test_onnxruntime_spins_boundedly_by_default_and_without_bound_on_request(
    exported, image, monkeypatch
):
    from ttspec_ros.backends import onnxruntime_backend

    model, out, _ = exported

    def entry(options, key):
        try:
            return options.get_session_config_entry(key)
        except RuntimeError:  # not set
            return None

    def entries(backbone):
        options = [b.session.get_session_options() for b in backbone._stages]
        return {
            (entry(o, "session.intra_op.allow_spinning"),
             entry(o, "session.intra_op.spin_duration_us"),
             entry(o, "session.force_spinning_stop"))
            for o in options
        }

    # Releases before 1.26 ignore spin_duration_us (they would spin without bound): sleep.
    assert onnxruntime_backend.bounded_spin_us("1.25.1") == 0
    assert onnxruntime_backend.bounded_spin_us("1.26.0") == onnxruntime_backend.SPIN_US > 0
    assert onnxruntime_backend.bounded_spin_us("2.0.0") == onnxruntime_backend.SPIN_US
    assert onnxruntime_backend.bounded_spin_us("custom") == 0
    expected = onnxruntime_backend.bounded_spin_us(onnxruntime.__version__)
    assert entries(OnnxRuntimeBackbone(out, num_threads=1)) == (
        {("1", str(expected), None)} if expected else {("0", None, None)})
    monkeypatch.setattr(onnxruntime_backend, "bounded_spin_us", lambda version: 0)
    assert entries(OnnxRuntimeBackbone(out, num_threads=1)) == {("0", None, None)}
    # Unbounded spinning (dedicated cores) stops when each run returns.
    spinning = OnnxRuntimeBackbone(out, num_threads=2, allow_spinning=True)
    assert entries(spinning) == {("1", None, "1")}
    carry = image
    for i, expected in enumerate(torch_reference(model, image)):
        carry, pooled = spinning.run_stage(i, carry)
        assert relative_difference(pooled, expected) < 1e-4


def test_onnxruntime_rejects_wrong_image_shape(exported):
    backbone = OnnxRuntimeBackbone(exported[1], num_threads=1)
    with pytest.raises(ValueError, match="does not match the exported graphs"):
        backbone.run_stage(0, torch.zeros(1, 1, 64, 64))


def test_tampered_graph_is_refused(exported, tmp_path):
    _, out, _ = exported
    for f in out.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "stage2.onnx").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="stage2.onnx is missing or does not match"):
        load_manifest(tmp_path)


def replace_graph_after_manifest_check(monkeypatch, backend_module, graph_dir) -> None:
    """Makes ``backend_module``'s manifest read end with stage 2's graph file replaced by stage
    1's (a valid graph with the same interface), as another writer could between a check of
    the files and their use."""
    real = backend_module.load_manifest

    def then_replace(*args, **kwargs):
        manifest = real(*args, **kwargs)
        (graph_dir / "stage2.onnx").write_bytes((graph_dir / "stage1.onnx").read_bytes())
        return manifest

    monkeypatch.setattr(backend_module, "load_manifest", then_replace)


def test_a_graph_replaced_after_the_manifest_check_is_refused(exported, tmp_path, monkeypatch):
    """The backbone runs the bytes it hash-checked. It checked the files by path and then opened
    them again: a graph replaced in between ran unchecked (here stage 1's column in stage 2's
    place, silently wrong features)."""
    from ttspec_ros.backends import onnxruntime_backend

    shutil.copytree(exported[1], tmp_path, dirs_exist_ok=True)
    replace_graph_after_manifest_check(monkeypatch, onnxruntime_backend, tmp_path)
    with pytest.raises(ValueError, match="stage2.onnx is missing or does not match its "
                                         "manifest hash; export the graphs again"):
        OnnxRuntimeBackbone(tmp_path, num_threads=1)


def test_create_backbone_onnxruntime_uses_cached_graphs(exported, tmp_path, image):
    model, out, _ = exported
    # The cache directory is named by backbone hash and size; put the CLI's export there.
    # (Exporting into an empty cache is covered by the tensorrt selection test.)
    graph_dir = tmp_path / f"onnx-{backbone_hash(model)[:16]}-{SIZE}x{SIZE}"
    shutil.copytree(out, graph_dir)
    stamps = {f.name: f.stat().st_mtime_ns for f in graph_dir.iterdir()}
    backbone = create_backbone("onnxruntime", model, num_threads=1, cache_dir=tmp_path,
                               image_size=SIZE)
    assert ensure_exported(model, SIZE, tmp_path) == graph_dir
    assert {f.name: f.stat().st_mtime_ns for f in graph_dir.iterdir()} == stamps
    assert [d.name for d in tmp_path.iterdir()] == [graph_dir.name]
    _, pooled = backbone.run_stage(0, image)
    assert relative_difference(pooled, torch_reference(model, image)[0]) < 1e-4


def test_graphs_of_an_older_export_version_are_exported_again(exported, tmp_path):
    model, out, _ = exported
    graph_dir = tmp_path / f"onnx-{backbone_hash(model)[:16]}-{SIZE}x{SIZE}"
    shutil.copytree(out, graph_dir)
    manifest = json.loads((graph_dir / "manifest.json").read_text())
    manifest["export_version"] = EXPORT_VERSION - 1
    (graph_dir / "manifest.json").write_text(json.dumps(manifest))
    assert ensure_exported(model, SIZE, tmp_path) == graph_dir
    assert load_manifest(graph_dir)["export_version"] == EXPORT_VERSION


def test_failed_export_leaves_no_file_behind(tmp_path, monkeypatch):
    def fails_half_way(module, args, f, **kwargs):
        f.write(b"partial graph") if hasattr(f, "write") else open(f, "wb").write(b"partial")
        raise RuntimeError("exporter failed")

    monkeypatch.setattr(torch.onnx, "export", fails_half_way)
    with pytest.raises(RuntimeError, match="exporter failed"):
        export_stages(make_tiny_model(), SIZE, tmp_path, include_unsplit=False)
    assert [p.name for p in tmp_path.iterdir()] == []


def test_export_leaves_the_model_as_it_was(tmp_path):
    model = make_tiny_model().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_stages(model, SIZE, tmp_path, include_unsplit=False)
    assert model.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_selection_errors_name_what_is_missing():
    model = make_tiny_model()
    with pytest.raises(ValueError, match="unknown backend 'openvino'.*torch, onnxruntime"):
        create_backbone("openvino", model)
    with pytest.raises(ValueError, match="needs image_size"):
        create_backbone("onnxruntime", model)
    with pytest.raises(BackendUnavailable, match="CPU execution provider only"):
        create_backbone("onnxruntime", model, device="cuda", image_size=SIZE)
    if importlib.util.find_spec("tensorrt") is None:
        with pytest.raises(BackendUnavailable, match="needs the `tensorrt` Python package"):
            create_backbone("tensorrt", model, device="cuda", image_size=SIZE)
    elif not torch.cuda.is_available():
        with pytest.raises(BackendUnavailable, match="CUDA device"):
            create_backbone("tensorrt", model, device="cuda", image_size=SIZE)
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailable, match="needs CUDA"):
            create_backbone("torch", model, device="cuda")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"image_size": 32.0}, "image_size must be a positive integer or a pair"),
        ({"image_size": (32,)}, r"image_size .* got \(32,\)"),
        ({"image_size": "32"}, "image_size .* got '32'"),
        ({"image_size": (32, 0)}, r"image_size .* got \(32, 0\)"),
        ({"image_size": True}, "image_size .* got True"),
        ({"image_size": SIZE, "num_threads": 0}, "num_threads must be None or an integer >= 1"),
        ({"image_size": SIZE, "num_threads": 1.5}, "num_threads .* got 1.5"),
        ({"image_size": SIZE, "num_threads": True}, "num_threads .* got True"),
    ],
)
@pytest.mark.parametrize("backend", ["onnxruntime", "tensorrt", "torch"])
def test_create_backbone_refuses_bad_parameters_before_any_work(tmp_path, backend, kwargs,
                                                                message):
    """Each was refused, if at all, mid-setup as an error naming no parameter ('cannot unpack
    non-iterable float', 'not all arguments converted'), num_threads=0 only after a full
    export into the cache, and 1.5 or True were int()-ed silently."""
    with pytest.raises(ValueError, match=message):
        create_backbone(backend, make_tiny_model(), cache_dir=tmp_path / "cache", **kwargs)
    assert not (tmp_path / "cache").exists()  # nothing exported


def test_onnxruntime_backbone_refuses_bad_num_threads(exported):
    for bad in (0, 1.5, True, "2"):
        with pytest.raises(ValueError, match=f"num_threads .* got {re.escape(repr(bad))}"):
            OnnxRuntimeBackbone(exported[1], num_threads=bad)


def test_image_size_may_be_any_integers_or_pair():
    model = make_tiny_model()
    for size in (SIZE, np.int64(SIZE), (SIZE, 2 * SIZE), [np.int32(SIZE), SIZE]):
        shape = image_shape_for(model, size)
        assert shape[:3] == (1, 1, SIZE) and all(type(v) is int for v in shape)


def test_export_without_onnxruntime(monkeypatch, tmp_path):
    """A TensorRT-only machine (a Jetson with JetPack's tensorrt and torch) exports the graphs
    without `onnxruntime`; the manifest just records no ORT version."""
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises
    manifest = export_stages(make_tiny_model(), SIZE, tmp_path / "graphs", include_unsplit=False)
    assert set(manifest["versions"]) == {"torch", "onnx"}
    assert load_manifest(tmp_path / "graphs")["num_stages"] == 4


def test_backbone_changing_strategy_needs_torch():
    require_torch_for_strategy("torch", "ttt", changes_backbone=True)
    require_torch_for_strategy("onnxruntime", "heads", changes_backbone=False)
    with pytest.raises(ValueError, match="changes backbone parameters.*'tensorrt'"):
        require_torch_for_strategy("tensorrt", "ttt", changes_backbone=True)


def test_create_backbone_torch():
    model = make_tiny_model()
    backbone = create_backbone("torch", model, num_threads=1)
    assert isinstance(backbone, TorchBackbone) and backbone.model is model


def test_cascade_on_onnxruntime_matches_torch_before_and_after_head_update(exported):
    model, out, _ = exported
    torch_cascade = Cascade(make_tiny_model(), [0.5] * 3)
    ort_cascade = Cascade(make_tiny_model(), [0.5] * 3,
                          backbone=OnnxRuntimeBackbone(out, num_threads=1))
    images = torch.randn(4, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    head = "cls_blocks.1.classifier.1.weight"
    update = {head: torch.randn(10, 32, generator=torch.Generator().manual_seed(4))}
    for version in (0, 1):
        if version:
            torch_cascade.apply_update(update, version)
            ort_cascade.apply_update(update, version)
        for img in images:
            for force in range(4):
                a = torch_cascade.run(img, force_exit=force)
                b = ort_cascade.run(img, force_exit=force)
                assert a.class_id == b.class_id and a.exit_index == b.exit_index
                assert relative_difference(b.logits, a.logits) < 1e-4
    with pytest.raises(ValueError, match="fixed graph"):
        ort_cascade.apply_update({"subnet0.alpha0": torch.zeros(1, 8, 1, 1)}, 2)


def test_bench_backends_writes_the_issue_schema(checkpoint, tmp_path):
    _, stem = checkpoint
    argv = ["bench-backends", "--out", str(tmp_path), "--models", "demo",
            "--demo-model", str(stem), "--backends", "torch,onnxruntime,tensorrt",
            "--threads", "1", "--repeats", "3", "--block", "2", "--warmup", "0"]
    assert cli.main(argv) == 0
    data = json.loads((tmp_path / "backends.json").read_text())
    assert set(data) == {"results", "stage_overhead"}
    assert {(r["backend"], r["exit"]) for r in data["results"]} >= {
        (b, e) for b in ("torch", "onnxruntime") for e in range(4)
    }
    for r in data["results"]:
        # The issue's fields, plus the median beside the mean.
        assert set(r) == {"model", "backend", "exit", "latency_ms", "latency_std_ms",
                          "latency_median_ms"}
        assert r["model"] == "demo" and r["latency_ms"] > 0 and r["latency_std_ms"] >= 0
        assert r["latency_median_ms"] > 0
    assert {o["backend"] for o in data["stage_overhead"]} == {"torch", "onnxruntime"}
    for o in data["stage_overhead"]:
        assert set(o) >= {"model", "backend", "staged_ms", "unsplit_ms"}
        assert o["staged_median_ms"] > 0 and o["unsplit_median_ms"] > 0
        assert isinstance(o["overhead_pct_paired_median"], float)
    meta = json.loads((tmp_path / "backends_meta.json").read_text())
    assert meta["seed"] == 0 and meta["block"] == 2
    assert meta["models"]["demo"]["accuracy_vs_torch"]["onnxruntime"]["pooled_max_rel_diff"] < 1e-4
    assert "demo/onnxruntime/stage_overhead_pct_paired_median" in meta["summary"]
    # the issue's reference point, a plain one-graph export, computes the same features
    model_meta = meta["models"]["demo"]
    assert model_meta["onnxruntime_plain_export_pooled_max_rel_diff"] < 1e-4
    assert model_meta["onnxruntime_plain_export"]["latency_median_ms"] > 0
    assert meta["summary"]["demo/onnxruntime_plain_export_speedup_vs_torch_unsplit"] > 0
    if X86:
        assert meta["models"]["demo"]["onnxruntime_blocked_carries"][0] == ["c1", "c3"]
    if importlib.util.find_spec("tensorrt") is None:
        assert [s["backend"] for s in meta["models"]["demo"]["skipped"]] == ["tensorrt"]


def test_blocks_time_every_job_the_requested_times_and_pair_staged_with_unsplit():
    import random

    from ttspec_ros.experiments.bench_backends import _time_in_blocks

    log: list[tuple] = []

    def job(key):
        return lambda: log.append(key)

    jobs = {
        name: {key: job(key) for key in [("exit", name, 0), ("exit", name, 1)]
               + ([("staged", name, None), ("unsplit", name, None)] if name == "a" else [])}
        for name in ("a", "b")
    }
    times, pairs = _time_in_blocks(jobs, repeats=5, block=2, rng=random.Random(0))
    assert {k: len(t) for k, t in times.items()} == {k: 5 for k in times}
    assert set(pairs) == {"a"} and len(pairs["a"]) == 5
    # One untimed block start (exit 0) per backend and block: 3 blocks of 2, 2, 1 repeats.
    assert len(log) == sum(len(j) for j in jobs.values()) * 5 + 2 * 3
    # Staged and unsplit always run back to back, and each block stays on one backend.
    for i, key in enumerate(log):
        if key[0] == "staged":
            assert ("unsplit", "a", None) in (log[i - 1], log[i + 1])
    runs = [k[1] for i, k in enumerate(log) if i == 0 or log[i - 1][1] != k[1]]
    assert runs == ["a", "b", "a", "b"]  # blocks a b | b a | a b: the order rotates per round


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"\xff\xfe not json", "not valid JSON"),
        (b"[]", "holds a JSON list"),
        (b'{"format": 1}', "'stages' is not a non-empty list"),
        (b'{"format": 1, "stages": "abc", "num_stages": 3}', "'stages' is not a non-empty list"),
    ],
)
def test_malformed_manifest_is_refused_by_name_and_exported_again(
    exported, tmp_path, content, reason
):
    """A manifest that is not one (truncated, another file, wrong types) is refused naming the
    file and the reason (it crashed as AttributeError/TypeError before), and a cache directory
    holding one is exported again instead of stopping the backend."""
    model, out, _ = exported
    graph_dir = tmp_path / f"onnx-{backbone_hash(model)[:16]}-{SIZE}x{SIZE}"
    shutil.copytree(out, graph_dir)
    (graph_dir / "manifest.json").write_bytes(content)
    with pytest.raises(ValueError, match=f"manifest.json .*{reason}"):
        load_manifest(graph_dir)
    assert ensure_exported(model, SIZE, tmp_path) == graph_dir
    assert load_manifest(graph_dir)["model_hash"] == backbone_hash(model)


def test_manifest_fields_the_backends_read_are_checked(exported, tmp_path):
    _, out, manifest = exported
    for f in out.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())

    def refused(change, reason):
        broken = json.loads(json.dumps(manifest))
        change(broken)
        (tmp_path / "manifest.json").write_text(json.dumps(broken))
        with pytest.raises(ValueError, match=f"malformed: {reason}"):
            load_manifest(tmp_path, verify_files=False)

    refused(lambda m: m.update(num_stages=5), "num_stages is 5 but it lists 4 stages")
    refused(lambda m: m["stages"][1].update(file="../stage1.onnx"), "stage 1 names file")
    refused(lambda m: m["stages"][2].update(index=0), "stage 2 has index 0")
    refused(lambda m: m["stages"][0]["outputs"].append(3), "stage 0 outputs are not a list")
    refused(lambda m: m.update(image_shape=[1, 1, 32]), "image_shape")
    refused(lambda m: m.update(unsplit=[]), "unsplit is not an object")
    # stage 0's graph, with its valid hash, as the unsplit one (it outputs `pooled` too)
    refused(lambda m: m["unsplit"].update(file="stage0.onnx", sha256=m["stages"][0]["sha256"]),
            "unsplit names file 'stage0.onnx', the exporter writes it to 'unsplit.onnx'")
    refused(lambda m: m.update(image_shape=[1, 1, 64, 64]),
            r"stage 0 takes an image of shape \[1, 1, 32, 32\], image_shape is \[1, 1, 64, 64\]")


@pytest.mark.parametrize(("side", "index"), [("outputs", 1), ("inputs", 2), ("unsplit", None)])
def test_manifest_shapes_that_are_not_the_graphs_are_refused(exported, tmp_path, image, side,
                                                             index):
    """The graph hashes hold, but a shape of the manifest is not its graph's: buffers are
    allocated by the manifest, so ONNX Runtime failed at the first frame. Refused at start
    (the unsplit graph: at its first use) naming the tensor and both shapes."""
    _, out, manifest = exported
    for f in out.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    broken = json.loads(json.dumps(manifest))
    entry = broken["unsplit"] if index is None else broken["stages"][index]
    tensor = entry["outputs" if index is None else side][0]
    tensor["shape"] = [*tensor["shape"][:-1], tensor["shape"][-1] + 1]
    (tmp_path / "manifest.json").write_text(json.dumps(broken))
    message = (rf"manifest.json does not match {entry['file']}: .* '{tensor['name']}' has shape "
               r"\[.*\] in the manifest, \[.*\] in the graph; export the graphs again")
    if index is not None:
        with pytest.raises(ValueError, match=message):
            OnnxRuntimeBackbone(tmp_path, num_threads=1)
        return
    backbone = OnnxRuntimeBackbone(tmp_path, num_threads=1)
    with pytest.raises(ValueError, match=message):
        backbone.run_unsplit(image)
    carry = image  # the stages still run
    for i in range(4):
        carry, pooled = backbone.run_stage(i, carry)


def _three_stage_manifest(manifest: dict) -> None:
    """A manifest consistent in itself, of 3 stages: not one for the 4-exit model."""
    del manifest["stages"][3]
    manifest["num_stages"] = 3
    manifest["stages"][2]["outputs"] = manifest["stages"][2]["outputs"][-1:]  # pooled only


def _stage_graphs(*sources: int):
    """A manifest change: stage i's entry names stage ``sources[i]``'s file, with that file's
    (valid) hash."""
    def change(manifest: dict) -> None:
        stages = manifest["stages"]
        graphs = [(stages[s]["file"], stages[s]["sha256"]) for s in sources]
        for entry, (file, sha256) in zip(stages, graphs, strict=True):
            entry.update(file=file, sha256=sha256)

    return change


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        # Stages 1 and 2 have the same tensor names and shapes: a manifest running one's graph
        # in the other's place passed every check and ran column 1 twice (wrong features).
        (_stage_graphs(0, 1, 1, 3),
         "stage 2 names file 'stage1.onnx', the exporter writes it to 'stage2.onnx'"),
        (_stage_graphs(0, 2, 1, 3), "stage 1 names file 'stage2.onnx'"),
        (lambda m: m["stages"][1]["outputs"].pop(),  # pooled
         r"stage 1 outputs are named \['c0', 'c1', 'c2', 'c3'\], the exporter writes"),
        (lambda m: m["stages"][1].update(outputs=[]), r"stage 1 outputs are named \[\]"),
        (lambda m: m["stages"][2]["inputs"].reverse(), r"stage 2 inputs are named \['c3_in'"),
        (lambda m: (m["stages"].pop(), m.update(num_stages=3)), "stage 2 outputs are named"),
        (_three_stage_manifest, None),  # well-formed, but for another number of exits
    ],
)
def test_manifest_that_does_not_match_the_graphs_is_exported_again(
    exported, tmp_path, image, change, reason
):
    """A well-formed manifest naming other tensors than its graphs, another stage's graph, or
    of another stage count than the model's exits, was reused: a KeyError ('pooled', 'c0') at
    the first frame, wrong features, or a ValueError about the heads on every start. It is
    refused by name and exported again."""
    model, out, manifest = exported
    graph_dir = tmp_path / f"onnx-{backbone_hash(model)[:16]}-{SIZE}x{SIZE}"
    shutil.copytree(out, graph_dir)
    broken = json.loads(json.dumps(manifest))
    change(broken)
    (graph_dir / "manifest.json").write_text(json.dumps(broken))
    if reason is not None:
        with pytest.raises(ValueError, match=f"manifest.json is malformed: {reason}"):
            load_manifest(graph_dir)
    backbone = create_backbone("onnxruntime", model, num_threads=1, cache_dir=tmp_path,
                               image_size=SIZE)
    again = load_manifest(graph_dir)
    assert again["num_stages"] == 4
    assert ([[o["name"] for o in e["outputs"]] for e in again["stages"]]
            == [[o["name"] for o in e["outputs"]] for e in manifest["stages"]])
    carry, expected = image, torch_reference(model, image)
    for i in range(4):
        carry, pooled = backbone.run_stage(i, carry)
        assert relative_difference(pooled, expected[i]) < 1e-4


def test_export_onnx_refuses_an_image_size_the_graphs_cannot_take(checkpoint, tmp_path, capsys):
    _, stem = checkpoint
    assert cli.main(["export-onnx", "--model", str(stem), "--out", str(tmp_path),
                     "--image-size", "30"]) == 2
    assert "--image-size: image size must be positive multiples" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("extra", "message"),
    [(["--backends", "torch,openvino"], r"unknown --backends \['openvino'\]"),
     # ran with no warm-up, exit 0
     (["--warmup", "-1"], r"--warmup must be >= 0, got -1"),
     # the model's rows were written twice and _summary kept the last run's
     (["--models", "demo,demo"], r"--models names \['demo'\] more than once"),
     (["--backends", "torch,torch"], r"--backends names \['torch'\] more than once")],
)
def test_bench_backends_refuses_bad_arguments_before_any_work(tmp_path, extra, message, capsys):
    # a missing model: any of these that got past the checks would fail on it, not benchmark
    argv = ["bench-backends", "--out", str(tmp_path / "out"), "--models", "demo",
            "--demo-model", str(tmp_path / "missing"), *extra]
    assert cli.main(argv) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_bench_export_time_leaves_out_building_the_backbones(checkpoint, tmp_path, monkeypatch):
    """export_s is the export's time: building sessions and TensorRT engines (minutes) after
    it was counted in too."""
    import argparse
    import time

    from ttspec_ros.experiments import bench_backends

    _, stem = checkpoint
    clock = [0.0]

    def perf_counter() -> float:
        clock[0] += 0.001
        return clock[0]

    build = bench_backends._build_backbones

    def slow_build(*a, **k):
        clock[0] += 1000.0  # an engine build
        return build(*a, **k)

    monkeypatch.setattr(time, "perf_counter", perf_counter)
    monkeypatch.setattr(bench_backends, "_build_backbones", slow_build)
    args = argparse.Namespace(seed=0, threads=1, repeats=2, block=1, warmup=0, out=str(tmp_path),
                              onnxruntime_spinning=False, tensorrt_precision="fp32",
                              cache_dir=None)
    meta = {"models": {}}
    bench_backends.bench_model("demo", str(stem), args, ["torch"], tmp_path, meta)
    assert meta["models"]["demo"]["export_s"] < 1000


def test_bench_backends_runs_without_onnxruntime_when_not_asked_for_it(
    checkpoint, tmp_path, monkeypatch, capsys
):
    """A Jetson may have tensorrt and no onnxruntime: the bench imported onnxruntime whatever
    --backends said, so it could not run there at all."""
    _, stem = checkpoint
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises
    argv = ["bench-backends", "--out", str(tmp_path), "--models", "demo", "--demo-model",
            str(stem), "--threads", "1", "--repeats", "2", "--block", "1", "--warmup", "0"]
    assert cli.main([*argv, "--backends", "torch,onnxruntime"]) == 2
    assert "onnxruntime needs the `onnxruntime` package" in capsys.readouterr().err
    assert cli.main([*argv, "--backends", "torch,tensorrt"]) == 0
    meta = json.loads((tmp_path / "backends_meta.json").read_text())
    assert meta["versions"]["onnxruntime"] is None
    results = json.loads((tmp_path / "backends.json").read_text())["results"]
    assert "torch" in {r["backend"] for r in results}
    assert "onnxruntime" not in {r["backend"] for r in results}
