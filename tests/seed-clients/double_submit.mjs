// A double submit with the guide's JavaScript client: two `createOrderWithRetry` calls with one
// key (SEED_IDEMPOTENCY_KEY), 50 ms apart. Prints one JSON line: what each caller ended with.
// Usage: SEED_IDEMPOTENCY_KEY=k node double_submit.mjs http://127.0.0.1:10000
import { WMSClient } from './wms_client.mjs';

const client = new WMSClient(process.argv[2]);
const order = { customerId: 'CUST-001', priority: 'standard', items: [{ sku: 'SKU-001', quantity: 2, price: 29.99 }] };
const outcome = (promise) => promise.then(
  (body) => ({ orderId: body.orderId }),
  (error) => ({ error: error.name, message: error.message }),
);
const first = outcome(client.createOrderWithRetry(order));
await new Promise((resolve) => setTimeout(resolve, 50));
const second = outcome(client.createOrderWithRetry(order));
console.log(JSON.stringify(await Promise.all([first, second])));
