#COMMON#
pbxra_dirs
pbxra_sysctl
if pbxra_systemd; then
  systemctl daemon-reload || :
  if [ "$1" -eq 1 ]; then
    systemctl enable --now pbx-remote-agent.service || :
  fi
fi
