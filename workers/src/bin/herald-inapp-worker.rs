//! `herald-inapp-worker`: delivers the inapp channel (deploy and scale on its own).

fn main() -> anyhow::Result<()> {
    herald_workers::main_for(herald_core::Channel::InApp)
}
