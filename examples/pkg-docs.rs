//! Generates the man page and shell completions of `pbx-remote-agent` from its clap definition
//! (`packaging/build.sh` runs it): `cargo run --example pkg-docs -- OUT_DIR`.

use clap::CommandFactory;
use clap_complete::Shell;
use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let out = PathBuf::from(
        std::env::args_os()
            .nth(1)
            .unwrap_or_else(|| "target/pkg-docs".into()),
    );
    std::fs::create_dir_all(out.join("completions"))?;
    let mut cmd = pbx_remote::cli::Cli::command();
    let name = cmd.get_name().to_string();

    let mut page = Vec::new();
    // Section 8: a system daemon (the unit's Documentation= says man:pbx-remote-agent(8)).
    clap_mangen::Man::new(cmd.clone())
        .section("8")
        .render(&mut page)?;
    std::fs::write(out.join(format!("{name}.8")), page)?;

    for (shell, file) in [
        (Shell::Bash, name.clone()),
        (Shell::Zsh, format!("_{name}")),
        (Shell::Fish, format!("{name}.fish")),
    ] {
        let path = out.join("completions").join(file);
        let mut f = std::fs::File::create(&path)?;
        clap_complete::generate(shell, &mut cmd, &name, &mut f);
        println!("{}", path.display());
    }
    println!("{}", out.join(format!("{name}.8")).display());
    Ok(())
}
