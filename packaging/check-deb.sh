#!/usr/bin/env bash
# Checks a built .deb: contents and modes, the conffile, the maintainer scripts, a stripped
# binary, and that the unpacked binary accepts the shipped config. Usage: check-deb.sh FILE.deb
set -euo pipefail
deb=$1
fail() { echo "FAIL: $*"; exit 1; }
scratch=$(mktemp -d)
saved_rmem= saved_wmem=
restore_ceilings() {
  if [ -n "$saved_rmem" ]; then
    echo "$saved_rmem" >/proc/sys/net/core/rmem_max; echo "$saved_wmem" >/proc/sys/net/core/wmem_max
    saved_rmem=
  fi
}
trap 'rm -rf "$scratch"; restore_ceilings' EXIT

listing=$(dpkg-deb -c "$deb")
expect() { # expect MODE PATH
  grep -qE "^$1 (root/root|0/0) +[0-9]+ [0-9-]+ [0-9:]+ \./$2\$" <<<"$listing" || fail "$2 missing or not $1"
}
expect '-rwxr-xr-x' 'usr/bin/pbx-remote-agent'
expect '-rw-r-----' 'etc/pbx-remote-agent/agent.toml'
expect '-rw-r--r--' 'usr/lib/systemd/system/pbx-remote-agent.service'
expect '-rw-r--r--' 'usr/lib/systemd/system/pbx-remote-provision.path'
expect '-rw-r--r--' 'usr/lib/systemd/system/pbx-remote-provision.service'
expect '-rwxr-xr-x' 'usr/libexec/pbx-remote-agent/provision-apply'
expect '-rw-r--r--' 'usr/lib/sysusers.d/pbx-remote-agent.conf'
expect '-rw-r--r--' 'usr/lib/tmpfiles.d/pbx-remote-agent.conf'
expect '-rw-r--r--' 'usr/lib/sysctl.d/30-pbx-remote-agent.conf'
expect '-rw-r--r--' 'usr/share/man/man8/pbx-remote-agent.8.gz'
expect '-rw-r--r--' 'usr/share/bash-completion/completions/pbx-remote-agent'
expect '-rw-r--r--' 'usr/share/zsh/vendor-completions/_pbx-remote-agent'
expect '-rw-r--r--' 'usr/share/fish/vendor_completions.d/pbx-remote-agent.fish'
echo "contents and modes: ok"

dpkg-deb -e "$deb" "$scratch/DEBIAN"
grep -qx '/etc/pbx-remote-agent/agent.toml' "$scratch/DEBIAN/conffiles" || fail "agent.toml is not a conffile"
for s in postinst prerm postrm; do [ -x "$scratch/DEBIAN/$s" ] || fail "no $s"; sh -n "$scratch/DEBIAN/$s" || fail "$s: syntax"; done
grep -q 'install -d -m 0700 -o pbx-remote-agent' "$scratch/DEBIAN/postinst" || fail "postinst does not create the 0700 state dir"
grep -q 'useradd --system' "$scratch/DEBIAN/postinst" || fail "postinst does not create the system user"
grep -q 'deb-systemd-invoke stop pbx-remote-agent.service' "$scratch/DEBIAN/prerm" || fail "prerm does not stop the service"
grep -q 'pbx-remote-agent deactivate --force' "$scratch/DEBIAN/prerm" || fail "prerm does not deactivate the PBX on its CM"
grep -q '0700 pbx-remote-agent' <(dpkg-deb --fsys-tarfile "$deb" | tar -xO ./usr/lib/tmpfiles.d/pbx-remote-agent.conf) || fail "tmpfiles: state dir not 0700"
grep -q 'pbxra_sysctl' "$scratch/DEBIAN/postinst" || fail "postinst does not raise the UDP buffer ceilings"
for k in rmem_max wmem_max; do
  grep -qx "net.core.$k = 4194304" <(dpkg-deb --fsys-tarfile "$deb" | tar -xO ./usr/lib/sysctl.d/30-pbx-remote-agent.conf) || fail "sysctl.d: no $k"
done
echo "conffile and scripts: ok"

# Debian's own checker: no error, no warning (the overrides it honours are shipped, each with why).
if command -v lintian >/dev/null 2>&1; then
  tags=$(lintian --fail-on none "$deb" 2>/dev/null | grep -E '^[EW]: ' || true)
  [ -z "$tags" ] || fail "lintian: $tags"
  echo "lintian: no error, no warning ($(lintian --version))"
elif [ "${PBXRA_REQUIRE_LINTIAN:-0}" = 1 ]; then
  fail "lintian is not installed"
fi

dpkg-deb -x "$deb" "$scratch/root"
bin="$scratch/root/usr/bin/pbx-remote-agent"
if nm "$bin" >/dev/null 2>&1 && [ -n "$(nm "$bin" 2>/dev/null | head -1)" ]; then fail "binary is not stripped"; fi
grep -qx 'enabled = false' "$scratch/root/etc/pbx-remote-agent/agent.toml" || fail "shipped config is not enabled = false"
zcat "$scratch/root/usr/share/man/man8/pbx-remote-agent.8.gz" | grep -q 'hash\\-password' || fail "man page lacks the subcommands"
grep -q 'hash-password' "$scratch/root/usr/share/bash-completion/completions/pbx-remote-agent" || fail "bash completion lacks the subcommands"
"$bin" check -c "$scratch/root/etc/pbx-remote-agent/agent.toml"
echo "unpacked binary accepts the shipped config: ok"
printf 'stripped agent: %s bytes\n' "$(stat -c %s "$bin")"

# Nothing the package installs or creates is writable by others (a path an unprivileged user
# could replace is a way to root: catalogue E3).
world_writable() {
  find /usr/bin/pbx-remote-agent /etc/pbx-remote-agent /var/lib/pbx-remote-agent /run/pbx-remote-agent \
    /usr/libexec/pbx-remote-agent /usr/lib/systemd/system/pbx-remote-* /usr/lib/sysusers.d/pbx-remote-agent.conf \
    /usr/lib/tmpfiles.d/pbx-remote-agent.conf /usr/lib/sysctl.d/30-pbx-remote-agent.conf \
    -perm -o+w ! -type l 2>/dev/null || true
  for d in /usr /usr/bin /etc /var/lib /usr/libexec /usr/lib/systemd/system; do
    [ -d "$d" ] && find "$d" -maxdepth 0 -perm -o+w ! -perm -1000
  done
}

# Optionally install it for real (CI does, on its throwaway machine): user, modes, an upgrade
# that keeps config and credential, removal that keeps state, purge that deletes it.
if [ "${PBXRA_INSTALL_TEST:-0}" = 1 ]; then
  if dpkg -s pbx-remote-agent >/dev/null 2>&1; then dpkg -P pbx-remote-agent >/dev/null; fi
  # The UDP buffer ceilings: raised from the stock value at install, a higher one left alone.
  rmem=/proc/sys/net/core/rmem_max wmem=/proc/sys/net/core/wmem_max
  ceilings=false
  if [ -w "$rmem" ] && [ -w "$wmem" ]; then
    ceilings=true
    saved_rmem=$(cat "$rmem") saved_wmem=$(cat "$wmem")
    echo 212992 >"$rmem"; echo 8388608 >"$wmem"
  fi
  dpkg -i "$deb" >/dev/null
  [ -z "$(world_writable)" ] || fail "world-writable after install: $(world_writable)"
  if $ceilings; then
    got="$(cat "$rmem") $(cat "$wmem")"
    restore_ceilings
    [ "$got" = "4194304 8388608" ] || fail "UDP buffer ceilings after install: $got (want 4194304, and 8388608 kept)"
  else
    echo "UDP buffer ceilings: /proc/sys/net/core not writable here, not checked"
  fi
  getent passwd pbx-remote-agent >/dev/null || fail "no pbx-remote-agent user after install"
  [ "$(stat -c '%a %U' /var/lib/pbx-remote-agent)" = "700 pbx-remote-agent" ] || fail "state dir: $(stat -c '%a %U' /var/lib/pbx-remote-agent)"
  [ "$(stat -c '%a %U:%G' /etc/pbx-remote-agent/agent.toml)" = "640 root:pbx-remote-agent" ] || fail "config: $(stat -c '%a %U:%G' /etc/pbx-remote-agent/agent.toml)"
  sed -i 's/^enabled = false$/enabled = false # edited by the PBX page/' /etc/pbx-remote-agent/agent.toml
  echo '{"device_id":"kept"}' >/var/lib/pbx-remote-agent/credential.json
  dpkg -i "$deb" >/dev/null  # same version again: the upgrade path of the scripts
  grep -q 'edited by the PBX page' /etc/pbx-remote-agent/agent.toml || fail "upgrade replaced the edited config"
  grep -q kept /var/lib/pbx-remote-agent/credential.json || fail "upgrade lost the credential"
  pbx-remote-agent check -c /etc/pbx-remote-agent/agent.toml >/dev/null || fail "installed binary rejects the config"
  [ -z "$(world_writable)" ] || fail "world-writable after upgrade: $(world_writable)"
  # Removal deactivates: the CM is told (here it cannot be: the shipped config names no reachable
  # CM, and this credential is not one) and the credential is deleted all the same, saying so.
  # tests/it/uninstall.rs runs the same command against a real CM.
  echo '{"audit":"kept until purge"}' >/var/lib/pbx-remote-agent/audit.log
  removal=$(dpkg -r pbx-remote-agent 2>&1)
  [ ! -e /usr/bin/pbx-remote-agent ] || fail "binary left after removal"
  grep -q 'deactivating this PBX on its CM' <<<"$removal" || fail "removal did not deactivate: $removal"
  grep -q 'deleted anyway' <<<"$removal" || fail "removal did not say what became of the registration: $removal"
  [ ! -e /var/lib/pbx-remote-agent/credential.json ] || fail "removal left the credential"
  [ -f /var/lib/pbx-remote-agent/audit.log ] || fail "removal (not purge) deleted the audit log"
  [ -f /etc/pbx-remote-agent/agent.toml ] || fail "removal (not purge) deleted the config"
  purge=$(dpkg -P pbx-remote-agent 2>&1)
  grep -q 'registration' <<<"$purge" || fail "purge did not say what became of the registration: $purge"
  [ ! -e /var/lib/pbx-remote-agent ] || fail "purge left the state dir"
  [ ! -e /etc/pbx-remote-agent ] || fail "purge left the config"
  [ ! -e /etc/systemd/system/multi-user.target.wants/pbx-remote-agent.service ] || fail "purge left the unit enabled"
  echo "install (with UDP buffer ceilings), upgrade, remove (deactivates), purge: ok, nothing world-writable"
fi
