"""The Vagrant lab (vagrant/; docs/design.md, "The lab"): no VM can boot here,
so what is checked is what can be without one -- `vagrant validate` of the
Vagrantfile for both providers, shellcheck of the provisioning scripts, and
that the scripts set up and check the same things as the namespace lab
(xdelab/lab.py). vagrant/README.md says what was verified where.

- libvirt: the vagrant-libvirt plugin (Debian package, installed by
  `make setup`) validates the libvirt provider block.
- VirtualBox: its provider refuses to validate unless `VBoxManage
  --version` answers, and VirtualBox is not in Debian; a stub that answers
  only that lets Vagrant validate the VirtualBox provider block (nothing
  else is ever asked of it by validate).
- `--ignore-provider`: the provider-independent configuration (networks,
  synced folders, provisioners and their script paths).
"""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from xdelab import lab

REPO = Path(__file__).resolve().parents[1]
VAGRANT_DIR = REPO / "vagrant"
SCRIPTS = [VAGRANT_DIR / "provision.sh", VAGRANT_DIR / "check.sh"]


def _need(tool):
    assert shutil.which(tool), f"{tool} is not installed (make setup installs it)"


def validate(tmp_path, *args, provider=None, vagrant_dir=VAGRANT_DIR, stub_vbox=False):
    """`vagrant validate` of vagrant_dir's Vagrantfile; its state directory
    (.vagrant) goes to tmp_path, never into the work tree."""
    _need("vagrant")
    env = dict(os.environ, VAGRANT_DOTFILE_PATH=str(tmp_path / "dotfile"),
               VAGRANT_CHECKPOINT_DISABLE="1", VAGRANT_NO_COLOR="1")
    env.pop("VAGRANT_DEFAULT_PROVIDER", None)
    if provider:
        env["VAGRANT_DEFAULT_PROVIDER"] = provider
    if stub_vbox:
        bindir = tmp_path / "bin"
        bindir.mkdir(exist_ok=True)
        stub = bindir / "VBoxManage"
        stub.write_text('#!/bin/sh\n[ "$1" = --version ] && echo 7.0.14r161095 && exit 0\n'
                        'echo "VBoxManage stub: $*" >&2\nexit 1\n')
        stub.chmod(0o755)
        env["PATH"] = f"{bindir}:{env['PATH']}"
    return subprocess.run(["vagrant", "validate", *args], cwd=vagrant_dir, env=env,
                          capture_output=True, text=True, timeout=180)


def assert_valid(p):
    assert p.returncode == 0 and "validated successfully" in p.stdout, \
        f"vagrant validate failed ({p.returncode}):\n{p.stdout}\n{p.stderr}"


def test_vagrantfile_validates_ignoring_providers(tmp_path):
    assert_valid(validate(tmp_path, "--ignore-provider"))


def test_vagrantfile_validates_for_libvirt(tmp_path):
    plugins = subprocess.run(["vagrant", "plugin", "list"], capture_output=True, text=True,
                             env=dict(os.environ, VAGRANT_CHECKPOINT_DISABLE="1"))
    assert "vagrant-libvirt" in plugins.stdout, \
        "the vagrant-libvirt plugin is missing (Debian package vagrant-libvirt; make setup)"
    assert_valid(validate(tmp_path, provider="libvirt"))


def test_vagrantfile_validates_for_virtualbox(tmp_path):
    assert_valid(validate(tmp_path, provider="virtualbox", stub_vbox=True))


@pytest.mark.parametrize("provider,block,bad", [
    ("libvirt", "lv.cpus = 2", "lv.cpuz = 2"),
    ("virtualbox", "vb.cpus = 2", "vb.cpuz = 2"),
])
def test_validate_catches_a_bad_provider_setting(tmp_path, provider, block, bad):
    """The validations above can fail: a misspelt provider setting is refused."""
    copy = tmp_path / "vagrant"
    shutil.copytree(VAGRANT_DIR, copy, ignore=shutil.ignore_patterns(".vagrant"))
    vf = copy / "Vagrantfile"
    text = vf.read_text()
    assert block in text
    vf.write_text(text.replace(block, bad))
    p = validate(tmp_path, provider=provider, vagrant_dir=copy, stub_vbox=True)
    assert p.returncode != 0 and "cpuz" in p.stdout + p.stderr, p.stdout + p.stderr


def test_validate_catches_a_missing_provisioning_script(tmp_path):
    copy = tmp_path / "vagrant"
    shutil.copytree(VAGRANT_DIR, copy, ignore=shutil.ignore_patterns(".vagrant"))
    (copy / "check.sh").unlink()
    p = validate(tmp_path, "--ignore-provider", vagrant_dir=copy)
    assert p.returncode != 0 and "check.sh" in p.stdout + p.stderr, p.stdout + p.stderr


def test_vagrantfile_topology():
    """Two sleds and a boundary/switch VM, each on both underlay networks,
    with libvirt and VirtualBox settings; sleds get setup and check."""
    text = (VAGRANT_DIR / "Vagrantfile").read_text()
    assert re.search(r'"boundary"\s*=>', text) and re.search(r'"sled1"\s*=>', text) \
        and re.search(r'"sled2"\s*=>', text)
    assert text.count('name: "xde-underlay') == 2
    assert "config.vm.provider :libvirt" in text and "config.vm.provider :virtualbox" in text
    assert 'path: "provision.sh"' in text and 'path: "check.sh"' in text


def test_scripts_pass_shellcheck():
    _need("shellcheck")
    p = subprocess.run(["shellcheck", "--shell=bash", "--severity=style", *map(str, SCRIPTS)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr


def test_shellcheck_can_fail(tmp_path):
    _need("shellcheck")
    bad = tmp_path / "bad.sh"
    bad.write_text("#!/usr/bin/env bash\nrm -rf $1/*\n")
    assert subprocess.run(["shellcheck", str(bad)], capture_output=True).returncode != 0


def _vars(path):
    """NAME=value assignments at the start of a line of a shell script."""
    return dict(re.findall(r"^([A-Z_]+)=([^\s#]+)", path.read_text(), re.M))


def test_scripts_use_the_namespace_labs_plan():
    """Same gateway, VNIs, boundary services and check targets as
    xdelab/lab.py, so the VMs answer the same pings as `xdectl lab ping`."""
    prov, chk = _vars(SCRIPTS[0]), _vars(SCRIPTS[1])
    assert prov["GW_MAC"] == lab.GW_MAC and prov["GW_IP"] == lab.GW_IP
    assert prov["VNI"] == str(lab.VNI) and prov["BSVC_VNI"] == str(lab.BSVC_VNI)
    assert prov["BSVC_ADDR"] == lab.BSVC_ADDR and prov["SUBNET"] == lab.SUBNET
    assert chk["GW_IP"] == lab.GW_IP and chk["OUTSIDE"] == lab.OUTSIDE
    for s in lab.SLEDS.values():   # guest n: 10.0.0.n, MAC ...:0n, host fd00:n::1
        n = s["n"]
        assert s["guest_ip"] == f"10.0.0.{n}" and s["mac"] == f"a8:40:25:ff:00:0{n}"
        assert s["addr"] == f"fd00:{n}::1"
    text = SCRIPTS[0].read_text()
    assert 'mac="a8:40:25:ff:00:0$n"' in text and 'ip="10.0.0.$n"' in text
    assert 'addr="fd00:$n::1"' in text
    assert "make -C \"$src\" setup" in text
    assert '"$xdectl" create xde0' in text and '"$xdectl" set-v2p' in text


def test_scripts_refuse_bad_arguments():
    for script, arg in ((SCRIPTS[0], "sled3"), (SCRIPTS[1], "7")):
        p = subprocess.run(["bash", str(script), arg], capture_output=True, text=True, timeout=30)
        assert p.returncode == 2, (script, p.returncode, p.stderr)
        assert p.stderr.strip()
