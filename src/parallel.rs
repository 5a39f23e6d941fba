//! An ordered parallel map: one thread produces chunks of work, every core works on them, and
//! the results come back in the order the chunks were produced. Used where each item's heavy part
//! (decoding a record, checking its own hash) is independent of the others but what follows
//! (checking links, folding state, hashing a file) must see them in order.

use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

/// Chunks queued per worker before the producer waits: bounds memory to a few chunks per core.
const QUEUED: usize = 2;

/// Runs `produce` on its own thread; every chunk it hands to its `emit` argument goes to one of
/// the workers in turn, which applies `work`; `consume` gets the results on the calling thread
/// in the order the chunks were emitted. `emit` returns false once nothing more is wanted (a
/// worker stopped), and `produce` should then stop. Returns what `produce` returns.
pub fn ordered_map<T, U, R>(
    produce: impl FnOnce(&mut dyn FnMut(T) -> bool) -> R + Send,
    work: impl Fn(T) -> U + Sync,
    mut consume: impl FnMut(U),
) -> R
where
    T: Send,
    U: Send,
    R: Send,
{
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 8);
    std::thread::scope(|scope| {
        let (mut inputs, mut outputs): (Vec<SyncSender<T>>, Vec<Receiver<U>>) = (vec![], vec![]);
        for _ in 0..workers {
            let (input, chunks) = sync_channel::<T>(QUEUED);
            let (output, results) = sync_channel::<U>(QUEUED);
            let work = &work;
            scope.spawn(move || {
                for chunk in chunks {
                    if output.send(work(chunk)).is_err() {
                        break;
                    }
                }
            });
            inputs.push(input);
            outputs.push(results);
        }
        let producer = scope.spawn(move || {
            let mut turn = 0;
            produce(&mut |chunk| {
                let sent = inputs[turn % inputs.len()].send(chunk).is_ok();
                turn += 1;
                sent
            })
            // Dropping `inputs` here ends each worker after its last chunk.
        });
        // A worker's results close after its last chunk, once the producer has returned.
        let mut turn = 0;
        while let Ok(result) = outputs[turn % outputs.len()].recv() {
            consume(result);
            turn += 1;
        }
        producer.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_come_back_in_the_order_produced() {
        let mut seen = Vec::new();
        let produced = ordered_map(
            |emit| (0..1000u64).take_while(|&i| emit(i)).count(),
            |i| {
                // Uneven work, so that workers finish out of order.
                std::thread::sleep(std::time::Duration::from_micros((i * 7919) % 50));
                i * 2
            },
            |r| seen.push(r),
        );
        assert_eq!(produced, 1000);
        assert_eq!(seen, (0..1000).map(|i| i * 2).collect::<Vec<_>>());
    }

    #[test]
    fn a_producer_that_emits_nothing_returns_at_once() {
        let mut seen = 0;
        let out = ordered_map(|_emit| 7, |i: u8| i, |_| seen += 1);
        assert_eq!((out, seen), (7, 0));
    }
}
