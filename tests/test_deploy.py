"""deploy/ stays true to the code: dashboards and alerts query only metrics that exist, and the files parse.

The exported names come from the code itself (the server's and the edge's
registries), so renaming a metric without its panels fails here. After a
short real run (a server, an edge daemon, sessions that meet and miss their
SLO) every metric a panel or an alert names has samples in a real scrape.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from urllib.request import Request, urlopen

import grpc
import pytest
import yaml
from conftest import make_client
from helpers import edge_daemon, running_server
from prometheus_client.parser import text_string_to_metric_families

from wisp_common.proto.wisp.v1 import wisp_pb2 as pb
from wisp_common.proto.wisp.v1 import wisp_pb2_grpc as pb_grpc
from wisp_common.request import Slo
from wisp_edge.metrics import EdgeMetrics
from wisp_server.metrics import ServerMetrics

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
MONITORING = DEPLOY / "monitoring"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "wisp.json"
ALERTS = MONITORING / "alerts.yml"
PROMETHEUS_OWN = {"up"}  # written by Prometheus for every scrape target, not by the code

# The sample names each metric type exposes, as prometheus_client writes them.
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
    "unknown": ("",),
}
PROMQL_WORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}


def exported(registry) -> set[str]:
    return {family.name + suffix for family in registry.collect() for suffix in SUFFIXES[family.type]}


def server_names() -> set[str]:
    return exported(ServerMetrics().registry)


def edge_names() -> set[str]:
    return exported(EdgeMetrics().registry)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (label names, functions, keywords and durations left out)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range durations
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)  # label lists
    names = set()
    for match in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr):
        following = expr[match.end() :].lstrip()
        if match.group() not in PROMQL_WORDS and not following.startswith("("):  # a function call
            names.add(match.group())
    return names


def dashboard_queries() -> dict[str, str]:
    """Every panel's queries, named by panel title."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return {
        f"{panel['title']} [{target['refId']}]": target["expr"]
        for panel in panels
        for target in panel.get("targets", [])
    }


def alert_queries() -> dict[str, str]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return {rule["alert"]: rule["expr"] for group in groups for rule in group["rules"]}


def test_the_extractor_finds_metric_names_only():
    expr = (
        'sum by (position) (rate(a_total{job="x", le="+Inf"}[$__rate_interval])) / ignoring(position) group_left '
        "sum(rate(b_total[5m])) > 0 and histogram_quantile(0.99, sum by (le) (rate(c_bucket[1m]))) or up"
    )
    assert metric_names(expr) == {"a_total", "b_total", "c_bucket", "up"}


def test_the_dashboard_tells_the_wisp_story():
    titles = " ".join(dashboard_queries()).lower()
    for topic in ("goodput", "slo attainment", "acceptance", "batch composition", "estimator", "kv cache", "ttft"):
        assert topic in titles, f"the dashboard has no panel on {topic}"
    dashboard = json.loads(DASHBOARD.read_text())
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_every_query_names_only_metrics_the_code_exports(source):
    queries = dashboard_queries() if source == "dashboard" else alert_queries()
    known = server_names() | edge_names() | PROMETHEUS_OWN
    unknown = {name: sorted(metric_names(expr) - known) for name, expr in queries.items() if metric_names(expr) - known}
    assert not unknown, f"{source} queries name metrics no code exports: {unknown}"


def test_the_server_exports_what_wisp_bench_and_the_issue_ask_for():
    names = server_names()
    for name in (
        # scraped by wisp-bench (wisp_bench/server_metrics.py)
        "wisp_batch_size_count",
        "wisp_verify_seconds_sum",
        "wisp_queue_seconds_sum",
        "wisp_estimator_mape_percent",
        "wisp_draft_tokens_total",
        "wisp_accepted_tokens_total",
        "wisp_server_decoded_tokens_total",
        "wisp_output_tokens_total",
        "wisp_stream_messages_total",
        # vLLM's spec-decode counters, mirrored
        "wisp_spec_decode_num_drafts_total",
        "wisp_spec_decode_num_draft_tokens_total",
        "wisp_spec_decode_num_accepted_tokens_total",
        "wisp_spec_decode_num_accepted_tokens_per_pos_total",
        "wisp_build_info",
        "process_cpu_seconds_total",
        "python_info",
    ):
        assert name in names


def test_prometheus_rules_and_grafana_provisioning_parse():
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    assert {job["job_name"] for job in config["scrape_configs"]} == {"wisp-server", "wisp-edge"}
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]
    for rule in (r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]):
        assert {"alert", "expr", "labels", "annotations"} <= set(rule), rule.get("alert")
    datasource = yaml.safe_load((MONITORING / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((MONITORING / "grafana/provisioning/dashboards/wisp.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


def test_compose_starts_the_server_prometheus_and_grafana_from_files_that_exist():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert set(compose["services"]) == {"wisp-server", "prometheus", "grafana"}
    build = compose["services"]["wisp-server"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).is_file()
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (DEPLOY / source).exists(), f"compose mounts {source}, which does not exist"
    mounted = {v.split(":")[1] for v in compose["services"]["grafana"]["volumes"]}
    assert {"/etc/grafana/provisioning", "/var/lib/grafana/dashboards"} <= mounted


@pytest.mark.parametrize("dockerfile", sorted((DEPLOY / "docker").glob("*.Dockerfile")), ids=lambda p: p.name)
def test_dockerfiles_copy_only_what_exists(dockerfile: Path):
    text = dockerfile.read_text()
    assert re.search(r"^FROM \S+", text, re.MULTILINE) and re.search(r"^ENTRYPOINT \[", text, re.MULTILINE)
    for line in re.findall(r"^COPY (.+)$", text, re.MULTILINE):
        for source in line.split()[:-1]:
            assert (ROOT / source).exists(), f"{dockerfile.name} copies {source}, which does not exist"


@pytest.mark.parametrize("unit", sorted((DEPLOY / "systemd").glob("*.service")), ids=lambda p: p.name)
def test_systemd_units_verify_and_notify(unit: Path):
    text = unit.read_text()
    assert "Type=notify" in text
    verified = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert verified.returncode == 0 and not verified.stderr.strip(), verified.stderr


def test_kubernetes_manifests_give_a_gpu_probe_grpc_health_and_render_with_kustomize():
    documents = list(yaml.safe_load_all((DEPLOY / "kubernetes" / "wisp-server.yaml").read_text()))
    by_kind = {}
    for document in documents:
        by_kind.setdefault(document["kind"], []).append(document)
    (deployment,) = by_kind["Deployment"]
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == ports["grpc"], probe
    for service in by_kind["Service"]:
        assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= set(ports)
    rendered = subprocess.run(
        ["kubectl", "kustomize", str(DEPLOY / "kubernetes")], capture_output=True, text=True, timeout=120
    )
    assert rendered.returncode == 0, rendered.stderr
    assert len(list(yaml.safe_load_all(rendered.stdout))) == len(documents)


# --- after a short real run -------------------------------------------------------------------------------------


def scrape(port: int) -> set[str]:
    """The names of every sample a real scrape holds."""
    text = urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


@pytest.mark.slow
def test_after_a_short_run_every_panel_and_alert_has_data(tiny_pair, smollm2_tokenizer, tmp_path):
    with running_server(tiny_pair[0], engine="hf", metrics_port=0) as server:
        address = f"127.0.0.1:{server.port}"
        with edge_daemon(address, tiny_pair[1], tmp_path / "edge.log", "--max-new-tokens", "16") as edge:
            body = json.dumps({"model": "any", "prompt": "The sea is", "max_tokens": 12, "temperature": 0})
            request = Request(f"{edge}/v1/completions", body.encode(), {"Content-Type": "application/json"})
            assert json.loads(urlopen(request, timeout=120).read())["choices"][0]["text"]
            edge_samples = scrape(int(edge.rsplit(":", 1)[1]))
        client = make_client(address, tiny_pair[1], smollm2_tokenizer)
        client.device = pb.DeviceInfo(device_id="pi", kind="raspberry-pi-5")
        prompt = smollm2_tokenizer.encode("The capital of France is")
        client.generate(prompt, max_new_tokens=12, ignore_eos=True, slo=Slo(ttft_seconds=60, tpot_seconds=60))
        client.generate(prompt, max_new_tokens=12, ignore_eos=True, slo=Slo(ttft_seconds=1e-9, tpot_seconds=1e-9))
        stub = pb_grpc.WispStub(grpc.insecure_channel(address))
        wrong = pb.OpenSession(draft_model=pb.ModelIdentity(tokenizer_fingerprint="0123456789abcdef"))
        with pytest.raises(grpc.RpcError):
            list(stub.Speculate(iter([pb.SpeculateRequest(open=wrong)]), timeout=30))
        generate = pb.GenerateRequest(prompt_token_ids=prompt, stop=pb.StopCondition(max_new_tokens=4))
        assert list(stub.Generate(generate, timeout=60))
        server_samples = scrape(server.metrics_port)

    empty = {}
    for name, expr in {**dashboard_queries(), **alert_queries()}.items():
        names = metric_names(expr) - PROMETHEUS_OWN
        edge = {n for n in names if n.startswith("wisp_edge_")}
        missing = sorted((names - edge - server_samples) | (edge - edge_samples))
        if missing:
            empty[name] = missing
    assert not empty, f"queries with no data after the run: {empty}"
