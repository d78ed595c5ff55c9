//! Writes every CRD into the directory given (default `crds/`), or prints them with `-`.

fn main() -> std::io::Result<()> {
    let target = std::env::args().nth(1).unwrap_or_else(|| "crds".into());
    for (name, yaml) in cairn_resources::crds() {
        if target == "-" {
            print!("---\n{yaml}");
        } else {
            std::fs::create_dir_all(&target)?;
            std::fs::write(std::path::Path::new(&target).join(name), yaml)?;
        }
    }
    Ok(())
}
