use nestbox_db::users::{self, NewUser};
use nestbox_db::{DbError, Page, UserStatus};
use nestbox_types::UserId;

use crate::common::user;

db_test!(create_and_get, |t| {
    let u = users::create(
        &t.db,
        &NewUser {
            email: "  Alice@Example.COM ".into(),
            name: "Alice".into(),
            password_hash: Some("h1".into()),
            is_admin: true,
        },
    )
    .await
    .unwrap();
    assert_eq!(u.email, "alice@example.com");
    assert_eq!(u.status, UserStatus::Active);
    assert!(u.is_admin);
    assert_eq!(users::get(&t.db, u.id).await.unwrap(), u);
    assert_eq!(
        users::get_by_email(&t.db, "ALICE@example.com")
            .await
            .unwrap(),
        Some(u.clone())
    );
    assert_eq!(
        users::get_by_email(&t.db, "bob@example.com").await.unwrap(),
        None
    );
    assert_eq!(users::count(&t.db).await.unwrap(), 1);
    let err = users::get(&t.db, UserId::new()).await.unwrap_err();
    assert!(
        matches!(err, DbError::NotFound { entity: "user", .. }),
        "{err:?}"
    );
});

db_test!(duplicate_email_conflicts_case_insensitively, |t| {
    user(&t.db, "dup@example.com").await;
    let err = users::create(
        &t.db,
        &NewUser {
            email: "DUP@example.com".into(),
            name: String::new(),
            password_hash: None,
            is_admin: false,
        },
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&err, DbError::Conflict { table, .. } if table == "users"),
        "{err:?}"
    );
    assert_eq!(users::count(&t.db).await.unwrap(), 1);
});

db_test!(updates, |t| {
    let u = user(&t.db, "upd@example.com").await;
    users::set_admin(&t.db, u.id, true).await.unwrap();
    users::set_status(&t.db, u.id, UserStatus::Disabled)
        .await
        .unwrap();
    users::set_password_hash(&t.db, u.id, Some("new"))
        .await
        .unwrap();
    users::set_name(&t.db, u.id, "Renamed").await.unwrap();
    let got = users::get(&t.db, u.id).await.unwrap();
    assert!(got.is_admin);
    assert_eq!(got.status, UserStatus::Disabled);
    assert_eq!(got.password_hash.as_deref(), Some("new"));
    assert_eq!(got.name, "Renamed");
    assert!(got.updated_at >= u.updated_at);
    users::set_password_hash(&t.db, u.id, None).await.unwrap();
    assert_eq!(users::get(&t.db, u.id).await.unwrap().password_hash, None);
    let err = users::set_admin(&t.db, UserId::new(), true)
        .await
        .unwrap_err();
    assert!(err.is_not_found());
});

db_test!(list_paginates, |t| {
    for i in 0..5 {
        user(&t.db, &format!("u{i}@example.com")).await;
    }
    // Force equal timestamps so that ties are broken by id.
    t.raw("UPDATE users SET created_at = (SELECT MIN(created_at) FROM users)")
        .await;
    let mut seen = Vec::new();
    let mut page = Page::first(2);
    loop {
        let p = users::list(&t.db, &page).await.unwrap();
        assert!(p.items.len() <= 2);
        seen.extend(p.items.iter().map(|u| u.id));
        match p.next_cursor {
            Some(c) => page = Page::after(2, c),
            None => break,
        }
    }
    let mut sorted = seen.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(seen, sorted, "id descending among equal timestamps");
    sorted.dedup();
    assert_eq!(sorted.len(), 5);
});
