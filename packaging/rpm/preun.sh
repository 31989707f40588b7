# Erase (not upgrade): stop the units, then deactivate the PBX on its CM (its key is revoked
# there; the credential here is deleted, also when the CM cannot be reached).
if [ "$1" -eq 0 ]; then
  if [ -d /run/systemd/system ]; then
    systemctl stop pbx-remote-agent.service pbx-remote-provision.path || :
    systemctl disable pbx-remote-agent.service pbx-remote-provision.path || :
  fi
  if [ -x /usr/bin/pbx-remote-agent ]; then
    echo "pbx-remote-agent: deactivating this PBX on its CM before removal"
    /usr/bin/pbx-remote-agent deactivate --force -c /etc/pbx-remote-agent/agent.toml || :
  fi
fi
