"""The Prometheus examples in conf/ load, and name only metrics the relay exports."""

import re
from pathlib import Path

import yaml
from prometheus_client import generate_latest
from prometheus_client.core import CollectorRegistry

from iw_relay.config import RelayConfig
from iw_relay.metrics import RelayCollector
from iw_relay.registry import RoomRegistry

CONF = Path(__file__).resolve().parent.parent / "conf"


def exported_names():
    from twisted.internet.task import Clock

    registry = RoomRegistry(RelayConfig(), Clock())
    collectors = CollectorRegistry()
    collectors.register(RelayCollector(registry))
    text = generate_latest(collectors).decode()
    return {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}, text


def test_alert_rules_load_and_use_only_exported_metrics():
    rules = yaml.safe_load((CONF / "iwrelay-alerts.yml").read_text())
    families, text = exported_names()
    samples = {line.split("{")[0].split()[0] for line in text.splitlines()
               if line and not line.startswith("#")}
    known = families | samples | {"up"}
    alerts = [rule for group in rules["groups"] for rule in group["rules"]]
    assert {"IwRelayDown", "IwRelaySlowConsumers", "IwRelayRefusingConnections"} <= {
        rule["alert"] for rule in alerts}
    for rule in alerts:
        used = set(re.findall(r"\b(iwrelay_[a-z_]+|up)\b", rule["expr"]))
        assert used, rule["alert"]
        assert used <= known, f"{rule['alert']} uses unknown metrics {used - known}"


def test_scrape_config_loads_and_points_at_the_rules():
    scrape = yaml.safe_load((CONF / "prometheus.yml").read_text())
    assert scrape["scrape_configs"][0]["job_name"] == "iwrelay"
    for rules in scrape["rule_files"]:
        assert (CONF / rules).exists()
