"""tests/devcluster.py: a missing dev cluster fails tests with the command to run."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import devcluster


def test_missing_broker_toml_fails_with_the_set_up_command(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(devcluster, "BROKER_TOML", tmp_path / "broker.toml")
    with pytest.raises(pytest.fail.Exception, match=r"deploy/dev-cluster/up\.sh"):
        devcluster.cluster("alpha")


def test_reads_connection_facts(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    toml = tmp_path / "broker.toml"
    toml.write_text(
        "[clusters.alpha]\n"
        'host = "127.0.0.1"\nport = 2221\nuser = "svc"\n'
        'private_key = "/k"\nknown_hosts = "/kh"\nslurm_bin_dir = "/usr/bin"\n'
        'slurm_conf = "/c/slurm.conf"\ndefault_partition = "gpu"\n'
        '[clusters.alpha.partitions.gpu]\ngpu_type = "h100"\n'
        '[clusters.alpha.partitions.debug]\ngpu_type = "h100"\n'
    )
    monkeypatch.setattr(devcluster, "BROKER_TOML", toml)
    dev = devcluster.cluster("alpha")
    assert (dev.host, dev.port, dev.user, dev.bin_dir) == ("127.0.0.1", 2221, "svc", "/usr/bin")
    assert dev.slurm_conf == Path("/c/slurm.conf")
    assert dev.partitions == {"gpu": "h100", "debug": "h100"}
    assert devcluster.cluster_names() == ["alpha"]
    with pytest.raises(pytest.fail.Exception, match="beta"):
        devcluster.cluster("beta")
