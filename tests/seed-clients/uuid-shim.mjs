// Stands in for the npm `uuid` package the guide imports: a random v4 UUID, or — to make two
// submits share one key, as a double click does — the key in SEED_IDEMPOTENCY_KEY.
import { randomUUID } from 'node:crypto';

export function v4() {
  return process.env.SEED_IDEMPOTENCY_KEY || randomUUID();
}
