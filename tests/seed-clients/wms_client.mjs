// The seed guide's JavaScript client ("For Client Developers" → "Using fetch API"), copied as
// the guide gives it; only the `uuid` import points at a local shim (no npm install in tests) and
// the error classes and `sleep`, which the guide uses without showing, are defined below it.
import { v4 as uuidv4 } from './uuid-shim.mjs'; // the guide imports 'uuid' (npm); see uuid-shim.mjs

class WMSClient {
  constructor(baseURL) {
    this.baseURL = baseURL;
  }

  async createOrder(orderData, options = {}) {
    // Generate idempotency key (or use provided one for retry)
    const idempotencyKey = options.idempotencyKey || uuidv4();

    const response = await fetch(`${this.baseURL}/api/v1/orders`, {
      method: 'POST',
      headers: {
        'Content-Type': 'application/json',
        'Idempotency-Key': idempotencyKey,
      },
      body: JSON.stringify(orderData),
    });

    if (response.ok) {
      return await response.json();
    }

    // Handle idempotency errors
    if (response.status === 409) {
      // Concurrent request - retry with exponential backoff
      throw new ConcurrentRequestError('Request is being processed', idempotencyKey);
    }

    if (response.status === 422) {
      // Parameter mismatch - don't retry with same key
      throw new ParameterMismatchError('Parameters changed', idempotencyKey);
    }

    throw new Error(`Request failed: ${response.status}`);
  }

  // Retry with exponential backoff
  async createOrderWithRetry(orderData, maxRetries = 3) {
    const idempotencyKey = uuidv4();

    for (let attempt = 0; attempt < maxRetries; attempt++) {
      try {
        return await this.createOrder(orderData, { idempotencyKey });
      } catch (error) {
        if (error instanceof ConcurrentRequestError && attempt < maxRetries - 1) {
          // Exponential backoff: 100ms, 200ms, 400ms
          const delay = Math.pow(2, attempt) * 100;
          await sleep(delay);
          continue;
        }
        throw error;
      }
    }
  }
}


export class ConcurrentRequestError extends Error {
  constructor(message, idempotencyKey) { super(message); this.name = 'ConcurrentRequestError'; this.idempotencyKey = idempotencyKey; }
}
export class ParameterMismatchError extends Error {
  constructor(message, idempotencyKey) { super(message); this.name = 'ParameterMismatchError'; this.idempotencyKey = idempotencyKey; }
}
function sleep(ms) { return new Promise((resolve) => setTimeout(resolve, ms)); }

export { WMSClient };
