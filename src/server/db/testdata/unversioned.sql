-- The registry schema exactly as servers before the versioned schema created it (no
-- user_version; three columns had been added by ALTER TABLE), with a row in every table.
CREATE TABLE IF NOT EXISTS devices (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    grp TEXT,
    comment TEXT,
    allow_passwordless INTEGER NOT NULL DEFAULT 0,
    allow_provisioning INTEGER NOT NULL DEFAULT 0,
    template TEXT,
    serial TEXT,
    mac TEXT,
    created_at INTEGER NOT NULL,
    activated_at INTEGER
);
CREATE TABLE IF NOT EXISTS codes (
    code_hash BLOB PRIMARY KEY,
    device_id TEXT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    used_at INTEGER,
    used_role TEXT
);
CREATE TABLE IF NOT EXISTS accounts (
    email TEXT PRIMARY KEY,
    password_hash TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS nodes (
    device_id TEXT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
    role TEXT NOT NULL,
    key_hash BLOB NOT NULL UNIQUE,
    serial TEXT, mac TEXT, firmware TEXT, model TEXT, edition TEXT,
    agent_version TEXT,
    ha_state TEXT,
    telemetry TEXT,
    online INTEGER NOT NULL DEFAULT 0,
    connected_at INTEGER,
    last_seen INTEGER,
    PRIMARY KEY (device_id, role)
);
CREATE TABLE IF NOT EXISTS visits (
    token_hash BLOB PRIMARY KEY,
    device_id TEXT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
    cm_user TEXT NOT NULL,
    passwordless INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    used_at INTEGER
);
CREATE TABLE IF NOT EXISTS grants (
    id TEXT PRIMARY KEY,
    secret_hash BLOB NOT NULL,
    device_id TEXT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
    cm_user TEXT NOT NULL,
    passwordless INTEGER NOT NULL,
    redeemed INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    ended_at INTEGER
);
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS provision_tasks (
    device_id TEXT PRIMARY KEY REFERENCES devices(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    state TEXT NOT NULL,
    output TEXT,
    updated_at INTEGER NOT NULL
);

-- Rows as the server wrote them before the schema was versioned (user_version 0).
INSERT INTO devices (id, name, grp, comment, allow_passwordless, allow_provisioning, template, serial, mac, created_at, activated_at)
  VALUES ('acme-hq-7k2mq', 'Acme HQ', 'east', 'front desk', 1, 1, 'tpl', 'SN1', '00:11:22:33:44:55', 1767225600, 1767225700);
INSERT INTO devices (id, name, created_at) VALUES ('spare-abcde', 'Spare', 1767225601);
INSERT INTO codes (code_hash, device_id, created_at, expires_at, used_at, used_role)
  VALUES (X'669C164F44198B43B7175AC0DFF496FE43393717428747CCB44C294FBEACA6E0', 'spare-abcde', 1767225601, 4102444800, NULL, NULL);
INSERT INTO accounts (email, password_hash, created_at) VALUES ('ops@example.com', '$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaGhhc2hoYXNoaGFzaGhhc2g', 1767225600);
INSERT INTO nodes (device_id, role, key_hash, serial, mac, firmware, model, edition, agent_version, ha_state, telemetry, online, connected_at, last_seen)
  VALUES ('acme-hq-7k2mq', 'primary', X'0101010101010101010101010101010101010101010101010101010101010101', 'SN1', '00:11:22:33:44:55', '83.19.0.110', 'P-Series', 'software', '0.1.0', 'active', '{"cpu_percent":12.5,"memory_used_bytes":1000,"memory_total_bytes":4000,"disk_used_bytes":10,"disk_total_bytes":100,"uptime_secs":60,"load":[0.1,0.2,0.3],"firmware":"83.19.0.110","agent_version":"0.1.0","portal_reachable":true,"portal_latency_ms":1.5,"portal_error":null,"ha_state":"active"}', 0, 1767225700, 1767225800);
INSERT INTO visits (token_hash, device_id, cm_user, passwordless, created_at, expires_at, used_at)
  VALUES (X'32E6E7A45605FD766962081F832BBA25514C28417C2DAAB41FF5B43FD4BDB1F2', 'acme-hq-7k2mq', 'alice', 0, 1767225800, 4102444800, NULL);
INSERT INTO grants (id, secret_hash, device_id, cm_user, passwordless, redeemed, created_at, expires_at, ended_at)
  VALUES ('grant1', X'F4E068BCABEAF80BCA2C3709413C36EF78C1F7A6F40FE284AECF91CE183FA91E', 'acme-hq-7k2mq', 'bob', 1, 0, 1767225800, 4102444800, NULL);
INSERT INTO settings (key, value) VALUES ('capacity', '25');
INSERT INTO provision_tasks (device_id, name, state, output, updated_at)
  VALUES ('acme-hq-7k2mq', 'Provision-Acme HQ-SN1', 'pending', NULL, 1767225600);
