use chrono::{Duration, Utc};
use nestbox_db::browser_sessions;
use nestbox_types::UserId;

use crate::common::team;

db_test!(create_find_delete, |t| {
    let (owner, _) = team(&t.db, "browser").await;
    let expires = Utc::now() + Duration::hours(1);
    let made = browser_sessions::create(&t.db, "h1", owner.id, expires)
        .await
        .unwrap();
    assert_eq!(made.user_id, owner.id);
    let found = browser_sessions::find(&t.db, "h1").await.unwrap().unwrap();
    assert_eq!(found.user_id, owner.id);
    assert!(browser_sessions::find(&t.db, "h2").await.unwrap().is_none());
    assert!(browser_sessions::delete(&t.db, "h1").await.unwrap());
    assert!(!browser_sessions::delete(&t.db, "h1").await.unwrap());
    assert!(browser_sessions::find(&t.db, "h1").await.unwrap().is_none());
});

db_test!(expired_sessions_are_not_found_and_are_swept, |t| {
    let (owner, _) = team(&t.db, "expiry").await;
    browser_sessions::create(&t.db, "old", owner.id, Utc::now() - Duration::seconds(1))
        .await
        .unwrap();
    assert!(
        browser_sessions::find(&t.db, "old")
            .await
            .unwrap()
            .is_none()
    );
    // The next session sweeps the expired one.
    browser_sessions::create(&t.db, "new", owner.id, Utc::now() + Duration::hours(1))
        .await
        .unwrap();
    assert!(!browser_sessions::delete(&t.db, "old").await.unwrap());
});

db_test!(sessions_end_with_their_user, |t| {
    let (owner, _) = team(&t.db, "gone").await;
    let expires = Utc::now() + Duration::hours(1);
    browser_sessions::create(&t.db, "a", owner.id, expires)
        .await
        .unwrap();
    browser_sessions::create(&t.db, "b", owner.id, expires)
        .await
        .unwrap();
    assert_eq!(
        browser_sessions::delete_for_user(&t.db, owner.id)
            .await
            .unwrap(),
        2
    );
    let err = browser_sessions::create(&t.db, "d", UserId::new(), expires)
        .await
        .unwrap_err();
    assert!(err.is_not_found(), "{err:?}");
});
