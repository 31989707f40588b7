if [ "$1" -eq 0 ] && [ -d /run/systemd/system ]; then
  systemctl stop pbx-remote-agent.service pbx-remote-provision.path || :
  systemctl disable pbx-remote-agent.service pbx-remote-provision.path || :
fi
