//! Status histories checked against the state machine: what a test sees
//! by polling a delivery must be a walk `DeliveryStatus::can_move_to`
//! allows, with any number of moves between two samples.

use std::collections::HashSet;

use herald_core::DeliveryStatus;

/// Whether `to` is reachable from `from` in one or more legal moves,
/// without an operator's replay (`failed|dead → queued`).
fn reachable(from: DeliveryStatus, to: DeliveryStatus) -> bool {
    let mut seen = HashSet::new();
    let mut frontier = vec![from];
    while let Some(at) = frontier.pop() {
        for &next in DeliveryStatus::ALL {
            let replay = matches!(at, DeliveryStatus::Failed | DeliveryStatus::Dead) && next == DeliveryStatus::Queued;
            if at.can_move_to(next) && !replay && seen.insert(next) {
                if next == to {
                    return true;
                }
                frontier.push(next);
            }
        }
    }
    false
}

/// Panics unless each sampled status of `id` (samples that changed)
/// follows from the one before it by legal moves.
pub fn assert_moves_forward(id: &str, statuses: &[String]) {
    let parsed: Vec<DeliveryStatus> = statuses
        .iter()
        .map(|s| s.parse().unwrap_or_else(|e| panic!("{id}: {e}")))
        .collect();
    for w in parsed.windows(2) {
        assert!(
            reachable(w[0], w[1]),
            "{id} went {} -> {}, which the state machine forbids (history {statuses:?})",
            w[0],
            w[1]
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_walks_pass_and_backward_ones_do_not() {
        assert!(reachable(DeliveryStatus::Queued, DeliveryStatus::Sent));
        assert!(reachable(DeliveryStatus::Retrying, DeliveryStatus::Retrying));
        assert!(!reachable(DeliveryStatus::Sent, DeliveryStatus::Sending));
        assert!(!reachable(DeliveryStatus::Dead, DeliveryStatus::Queued));
        assert!(!reachable(DeliveryStatus::Delivered, DeliveryStatus::Queued));
    }
}
