// pgjdbc against `tally serve`, driven by the system tests
// (tests/system/serve.rs): java -cp postgresql.jar Jdbc.java URL USER PASSWORD TENANT
// Prints one line per fact, tab-separated, so the Rust side can compare.
import java.sql.*;

public class Jdbc {
    public static void main(String[] args) throws Exception {
        try (Connection c = DriverManager.getConnection(args[0], args[1], args[2])) {
            try (PreparedStatement ps = c.prepareStatement(
                    "SELECT tenant, metric, window_start, sum FROM usage "
                    + "WHERE tenant = ? AND granularity = ? ORDER BY metric, window_start LIMIT 5")) {
                ps.setString(1, args[3]);
                ps.setString(2, "day");
                // Run it twice so pgjdbc switches to a named server-side statement.
                for (int round = 0; round < 6; round++) {
                    try (ResultSet rs = ps.executeQuery()) {
                        while (rs.next()) {
                            if (round == 5) {
                                System.out.println("ROW\t" + rs.getString(1) + "\t" + rs.getString(2) + "\t"
                                    + rs.getTimestamp(3).toInstant() + "\t" + rs.getBigDecimal(4).toPlainString());
                            }
                        }
                    }
                }
            }
            c.setAutoCommit(false);
            try (Statement st = c.createStatement()) {
                st.setFetchSize(3);
                try (ResultSet rs = st.executeQuery("SELECT checkpoint_seq FROM _tally_clock")) {
                    rs.next();
                    System.out.println("CHECKPOINT\t" + rs.getLong(1));
                }
            }
            c.commit();
            DatabaseMetaData md = c.getMetaData();
            System.out.println("PRODUCT\t" + md.getDatabaseProductName() + "\t" + md.getDatabaseProductVersion());
            try (ResultSet rs = md.getTables(null, "public", "%", new String[] {"TABLE", "VIEW"})) {
                while (rs.next()) {
                    System.out.println("TABLE\t" + rs.getString("TABLE_NAME"));
                }
            }
            try (ResultSet rs = md.getColumns(null, "public", "usage", "%")) {
                while (rs.next()) {
                    System.out.println("COLUMN\t" + rs.getString("COLUMN_NAME") + "\t" + rs.getString("TYPE_NAME"));
                }
            }
            try (Statement st = c.createStatement()) {
                st.executeQuery("DELETE FROM usage");
            } catch (SQLException e) {
                System.out.println("REFUSED\t" + e.getSQLState());
            }
        }
    }
}
