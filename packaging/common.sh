# Shared by the .deb and .rpm scripts (inlined into each by packaging/build.sh; no file of the
# package is needed at script time).
pbxra_user() {
  if ! getent passwd pbx-remote-agent >/dev/null 2>&1; then
    if command -v systemd-sysusers >/dev/null 2>&1 && [ -f /usr/lib/sysusers.d/pbx-remote-agent.conf ]; then
      systemd-sysusers pbx-remote-agent.conf
    else
      useradd --system --user-group --home-dir /var/lib/pbx-remote-agent --no-create-home \
        --shell /usr/sbin/nologin --comment "PBX Remote Management agent" pbx-remote-agent
    fi
  fi
}
pbxra_dirs() {
  # 0700 state dir owned by the agent; the config is readable by the agent and root only
  # (it may hold an authentication code or a password until activation).
  install -d -m 0700 -o pbx-remote-agent -g pbx-remote-agent /var/lib/pbx-remote-agent
  chmod 0700 /var/lib/pbx-remote-agent
  if [ -f /etc/pbx-remote-agent/agent.toml ]; then
    chown root:pbx-remote-agent /etc/pbx-remote-agent/agent.toml
    chmod 0640 /etc/pbx-remote-agent/agent.toml
  fi
}
pbxra_systemd() { [ -d /run/systemd/system ]; }
pbxra_sysctl() {
  # The ceilings of the shipped sysctl.d file, now rather than at the next boot; a higher value
  # already set is kept. Best effort (a container may forbid it).
  conf=/usr/lib/sysctl.d/30-pbx-remote-agent.conf
  [ -r "$conf" ] || return 0
  grep '^net\.' "$conf" | while read -r key _ want; do
    f=/proc/sys/$(echo "$key" | tr . /)
    [ -w "$f" ] || continue
    [ "$(cat "$f" 2>/dev/null || echo 0)" -ge "$want" ] || echo "$want" >"$f" 2>/dev/null || true
  done
}
