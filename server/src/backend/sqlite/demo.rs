//! The demo data set of the built-in `demo` source: a small shop with
//! customers, products, orders and order lines, generated deterministically
//! so every checkout sees the same rows.

use rusqlite::{params, Connection};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS customers (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    email TEXT NOT NULL UNIQUE,
    country TEXT NOT NULL,
    signed_up DATE NOT NULL,
    vip BOOLEAN NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS products (
    id INTEGER PRIMARY KEY,
    sku TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    category TEXT NOT NULL,
    price DECIMAL(10,2) NOT NULL,
    stock INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS orders (
    id INTEGER PRIMARY KEY,
    customer_id INTEGER NOT NULL REFERENCES customers(id),
    ordered_at DATETIME NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'paid', 'shipped', 'cancelled'))
);
CREATE INDEX IF NOT EXISTS orders_customer ON orders(customer_id);
CREATE TABLE IF NOT EXISTS order_items (
    order_id INTEGER NOT NULL REFERENCES orders(id) ON DELETE CASCADE,
    product_id INTEGER NOT NULL REFERENCES products(id),
    quantity INTEGER NOT NULL CHECK (quantity > 0),
    unit_price DECIMAL(10,2) NOT NULL,
    PRIMARY KEY (order_id, product_id)
);
CREATE VIEW IF NOT EXISTS order_totals AS
    SELECT o.id AS order_id, o.customer_id, o.status, SUM(i.quantity * i.unit_price) AS total
    FROM orders o JOIN order_items i ON i.order_id = o.id GROUP BY o.id;
";

const FIRST: &[&str] = &[
    "Ada",
    "Alan",
    "Grace",
    "Linus",
    "Margaret",
    "Dennis",
    "Barbara",
    "Ken",
    "Frances",
    "Edsger",
    "Radia",
    "Tim",
    "Hedy",
    "Donald",
    "Katherine",
    "John",
    "Sophie",
    "Niklaus",
    "Jean",
    "Bjarne",
];
const LAST: &[&str] = &[
    "Lovelace",
    "Turing",
    "Hopper",
    "Torvalds",
    "Hamilton",
    "Ritchie",
    "Liskov",
    "Thompson",
    "Allen",
    "Dijkstra",
    "Perlman",
    "Berners-Lee",
    "Lamarr",
    "Knuth",
    "Johnson",
    "McCarthy",
    "Wilson",
    "Wirth",
    "Sammet",
    "Stroustrup",
];
const COUNTRIES: &[&str] = &["DE", "FR", "GB", "US", "NL", "SE", "JP", "BR", "IN", "CA"];
const CATEGORIES: &[&str] = &[
    "books", "games", "garden", "kitchen", "music", "office", "sports", "toys",
];
const ADJECTIVES: &[&str] = &["Classic", "Compact", "Deluxe", "Eco", "Mini", "Pro", "Smart", "Vintage"];
const NOUNS: &[&str] = &[
    "Lamp", "Kettle", "Chair", "Puzzle", "Racket", "Notebook", "Speaker", "Planter", "Mug", "Kite",
];
const STATUSES: &[&str] = &["pending", "paid", "shipped", "shipped", "shipped", "cancelled"];

pub const CUSTOMERS: i64 = 500;
pub const PRODUCTS: i64 = 120;
pub const ORDERS: i64 = 3_000;

/// xorshift64*: deterministic and dependency-free.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[(self.next() % items.len() as u64) as usize]
    }
}

/// Creates and fills the demo tables unless they already hold data.
pub fn seed(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(SCHEMA)?;
    let existing: i64 = conn.query_row("SELECT COUNT(*) FROM customers", [], |r| r.get(0))?;
    if existing > 0 {
        return Ok(());
    }
    let mut rng = Rng(0x5eed_cafe_f00d_d00d);
    conn.execute_batch("BEGIN")?;
    {
        let mut insert = conn.prepare("INSERT INTO customers VALUES (?1, ?2, ?3, ?4, ?5, ?6)")?;
        for id in 1..=CUSTOMERS {
            let (first, last) = (rng.pick(FIRST), rng.pick(LAST));
            let name = format!("{first} {last}");
            let email = format!("{}.{}{id}@example.com", first.to_lowercase(), last.to_lowercase());
            let signed_up = format!(
                "20{:02}-{:02}-{:02}",
                18 + rng.below(7),
                1 + rng.below(12),
                1 + rng.below(28)
            );
            insert.execute(params![
                id,
                name,
                email,
                rng.pick(COUNTRIES),
                signed_up,
                rng.below(10) == 0
            ])?;
        }
        let mut insert = conn.prepare("INSERT INTO products VALUES (?1, ?2, ?3, ?4, ?5, ?6)")?;
        let mut prices = Vec::with_capacity(PRODUCTS as usize);
        for id in 1..=PRODUCTS {
            let name = format!("{} {}", rng.pick(ADJECTIVES), rng.pick(NOUNS));
            let cents = 199 + rng.below(25_000);
            let price = format!("{}.{:02}", cents / 100, cents % 100);
            prices.push(price.clone());
            insert.execute(params![
                id,
                format!("SKU-{id:05}"),
                name,
                rng.pick(CATEGORIES),
                price,
                rng.below(500)
            ])?;
        }
        let mut order = conn.prepare("INSERT INTO orders VALUES (?1, ?2, ?3, ?4)")?;
        let mut item = conn.prepare("INSERT OR IGNORE INTO order_items VALUES (?1, ?2, ?3, ?4)")?;
        for id in 1..=ORDERS {
            let at = format!(
                "2025-{:02}-{:02} {:02}:{:02}:{:02}",
                1 + rng.below(12),
                1 + rng.below(28),
                rng.below(24),
                rng.below(60),
                rng.below(60)
            );
            order.execute(params![
                id,
                1 + rng.below(CUSTOMERS as u64) as i64,
                at,
                rng.pick(STATUSES)
            ])?;
            for _ in 0..1 + rng.below(5) {
                let product = rng.below(PRODUCTS as u64) as usize;
                item.execute(params![
                    id,
                    product as i64 + 1,
                    1 + rng.below(4) as i64,
                    prices[product]
                ])?;
            }
        }
    }
    conn.execute_batch("COMMIT; ANALYZE")?;
    Ok(())
}
