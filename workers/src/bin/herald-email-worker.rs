//! `herald-email-worker`: delivers the email channel (deploy and scale on its own).

fn main() -> anyhow::Result<()> {
    herald_workers::main_for(herald_core::Channel::Email)
}
